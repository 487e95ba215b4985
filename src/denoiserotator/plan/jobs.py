"""The plan check: what a grid asks of a site, before a single job is submitted.

    python -m denoiserotator.plan --config config/config.yaml --site site.yaml --retries 1

prints, per rule step and model, the jobs, the partition they go to, their GPUs, host memory and
time per attempt, the resuming attempts, and the GPU-hours asked; then every job that no partition
of the site holds, with the reason. The requests are the ones the rules make (`costs.job_request`,
the function `workflow/rules/common.smk` calls), and the jobs are the grid's own
(`Experiment.rows`); `tests/plan/test_site_and_plan.py` checks both against `snakemake -n`. Exit
status 1 when a job does not fit. `--site` is the SLURM plugin's partition file
(`denoiserotator.plan.cluster`); without it, the site of the environment
(SNAKEMAKE_SLURM_PARTITIONS or the DENOISEROTATOR_MAX_* variables).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass

from denoiserotator.plan import costs
from denoiserotator.plan.cluster import Site
from denoiserotator.plan.experiment import Experiment

STEPS: tuple[str, ...] = ("calibrate", "prune", "finetune", "perplexity", "zeroshot", "sparsity")


@dataclass(frozen=True)
class PlannedJob:
    """One job of the grid: its rule step, model, whether its row is rotated, and the prune
    folder's variant name (prune jobs only)."""

    step: str
    model: str
    rotated: bool = False
    variant: str | None = None
    name: str = ""


def grid_jobs(exp: Experiment) -> list[PlannedJob]:
    """The SLURM jobs of the whole grid (the local fetch and table rules are left out)."""
    jobs: list[PlannedJob] = []
    prune_folders: dict[str, PlannedJob] = {}
    calibrated: set[str] = set()
    for row in exp.rows():
        rotated = row.rotation == "denoise"
        if row.variant is not None and row.prune_dir not in prune_folders:
            prune_folders[row.prune_dir] = PlannedJob("prune", row.model, not row.variant.endswith("_none"),
                                                      row.variant, row.prune_dir)  # fmt: skip
            calibrated.add(row.model)
        if row.lora:
            jobs.append(PlannedJob("finetune", row.model, rotated, name=row.path))
        files = exp.row_files(row)
        jobs += [PlannedJob("perplexity", row.model, rotated, f"{row.path} {ppl}") for ppl in files["ppl"]]
        if "zeroshot" in files:
            jobs.append(PlannedJob("zeroshot", row.model, rotated, name=row.path))
        jobs.append(PlannedJob("sparsity", row.model, rotated, name=row.path))
    calibrate = [PlannedJob("calibrate", model, name=model) for model in exp.models if model in calibrated]
    return calibrate + list(prune_folders.values()) + jobs


# Retries a prune job keeps for failures other than its time limit (a node failure, a preemption),
# on top of the resuming attempts its length needs.
RETRIES_FOR_FAILURES = 1


def prune_retries(exp: Experiment, site: Site, retries: int) -> int:
    """The prune rule's retries: at least `retries` (Snakemake's --retries, the profile's
    restart-times), and enough for the longest prune job's resuming attempts on `site` plus
    RETRIES_FOR_FAILURES, so a 70B job that needs two attempts still survives a node failure.
    Jobs no partition holds are left to the planning check, which names them."""
    needed = 1
    for job in grid_jobs(exp):
        if job.step == "prune":
            try:
                request = costs.job_request(exp, job.model, "prune", job.rotated, job.variant, 1, site)
            except costs.ResourceLimitError:
                continue
            needed = max(needed, request.attempts)
    return max(retries, needed - 1 + RETRIES_FOR_FAILURES)


@dataclass
class Plan:
    """Requests per (step, model) and the jobs that fit no partition."""

    groups: dict[tuple[str, str], list[costs.JobRequest]]
    refused: list[tuple[PlannedJob, str]]
    folder_bytes: float = 0.0  # the model folders prune and finetune jobs write

    @property
    def gpu_hours(self) -> float:
        """GPU-hours asked: every attempt of every job at its request."""
        return sum(r.gpus * r.runtime * r.attempts / 60 for group in self.groups.values() for r in group)

    def render(self) -> str:
        header = ("step", "model", "jobs", "partition", "GPUs", "host RAM", "time/attempt", "attempts",
                  "GPU-hours")  # fmt: skip
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        order = sorted(self.groups.items(), key=lambda item: (STEPS.index(item[0][0]), item[0][1]))
        for (step, model), requests in order:
            def span(values: list[float], unit: str = "", scale: float = 1.0) -> str:
                low, high = min(values) / scale, max(values) / scale
                text = f"{low:.3g}" if low == high else f"{low:.3g}–{high:.3g}"
                return f"{text} {unit}" if unit else text

            partitions = sorted({r.partition.name or "(default)" for r in requests})
            hours = sum(r.gpus * r.runtime * r.attempts / 60 for r in requests)
            lines.append("| " + " | ".join([
                step, model, str(len(requests)), ", ".join(partitions),
                span([r.gpus for r in requests]), span([r.mem_mb for r in requests], "GB", 1024),
                span([r.runtime for r in requests], "h", 60), span([r.attempts for r in requests]),
                f"{hours:.0f}",
            ]) + " |")  # fmt: skip
        jobs = sum(len(group) for group in self.groups.values())
        lines.append("")
        lines.append(f"{jobs} jobs, {self.gpu_hours:.0f} GPU-hours asked (every attempt at its request)")
        lines.append(f"{self.folder_bytes / 1e12:.1f} TB of model folders written (in each model's dtype)")
        lines.append(f"{len(self.refused)} job(s) do not fit the site")
        lines += [f"  - {job.step} {job.name}: {reason}" for job, reason in self.refused]
        return "\n".join(lines) + "\n"


def plan(exp: Experiment, site: Site, retries: int | None = None) -> Plan:
    """The grid's first-attempt requests on `site` (`costs.job_request`), grouped by step and
    model, and the jobs that fit no partition with the reason. `retries`: Snakemake's --retries
    (the profile's restart-times), which long prune jobs need for their resuming attempts."""
    groups: dict[tuple[str, str], list[costs.JobRequest]] = defaultdict(list)
    refused: list[tuple[PlannedJob, str]] = []
    folders = 0.0
    for job in grid_jobs(exp):
        if job.step in ("prune", "finetune"):
            folders += costs.loaded_bytes(exp, job.model, job.rotated)
        try:
            request = costs.job_request(exp, job.model, job.step, job.rotated, job.variant, 1, site,
                                        retries if job.step == "prune" else None)  # fmt: skip
        except costs.ResourceLimitError as error:
            refused.append((job, str(error)))
            continue
        groups[(job.step, job.model)].append(request)
    return Plan(dict(groups), refused, folders)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="What the grid asks of the site, before submitting.")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--site", default=None,
                        help="the SLURM plugin's partition file (default: the environment's)")  # fmt: skip
    parser.add_argument("--retries", type=int, default=1, help="Snakemake's --retries (the slurm profile: 1)")
    args = parser.parse_args(argv)
    site = Site.from_file(args.site) if args.site else Site.from_environment()
    result = plan(costs.load_experiment(args.config), site, args.retries)
    print(f"site: {site.source}")
    for partition in site.partitions:
        print(f"  {partition.describe()}")
    print()
    print(result.render(), end="")
    sys.exit(1 if result.refused else 0)


if __name__ == "__main__":
    main()
