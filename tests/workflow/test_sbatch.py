"""The sbatch lines the SLURM profile produces, without SLURM (runs in `make test`).

Snakemake plans the demo and the paper configs through `--profile profiles/slurm` (a dry run:
nothing is submitted, no SLURM command is called); the resources it prints for each job are then
handed to the plugin's own sbatch builder (snakemake-executor-plugin-slurm 2.8.0:
`submit_string.get_submit_command` + `utils.set_gres_string`, exactly what `Executor.run_job`
concatenates). A dry run prints no thread counts, so the CPU flag is not what is checked here.
Claims:

* a job that needs no GPU gets no GPU flag at all (the demo computes on the CPU: gpu 0);
* paper-grid GPU jobs get `--gpus=a100:<n>` by default, `--gpus=<n>` with an empty
  DENOISEROTATOR_GPU_MODEL, and `--gres=gpu:a100:<n>` (and no `--gpus`) with
  DENOISEROTATOR_GPU_FLAG=gres;
* local rules (the fetches, the tables) are never submitted.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from denoiserotator.plan import costs
from denoiserotator.plan.experiment import Row

pytest.importorskip("snakemake_executor_plugin_slurm")
from snakemake_executor_plugin_slurm.submit_string import get_submit_command  # noqa: E402
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402

from tests.conftest import ROOT

GPU_RULES = {"prune", "finetune", "perplexity", "zeroshot"}


class _Resources(dict):
    """What the plugin reads from `job.resources`: `.get(name)` and attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


def local_rules() -> set[str]:
    """The Snakefile's `localrules:` (a dry run prints them as `rule` like the others)."""
    block = (ROOT / "Snakefile").read_text().split("\nlocalrules:\n", 1)[1].split("\n\n", 1)[0]
    return {name.strip(" ,") for name in block.split() if name.strip(" ,")}


def planned_jobs(config: str | None, **env: str) -> list[dict[str, Any]]:
    """Jobs of `snakemake --profile profiles/slurm -n` with their rule, threads and resources."""
    args = ["results/tables/main.csv"] + (["--configfile", config] if config else [])
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DENOISEROTATOR_")}
    environ.update(SLURM_ACCOUNT="acct", SLURM_PARTITION="gpu", **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environ.get("PYTHONPATH", "")])
    # --forceall: plan every job even where this checkout already has results (after make demo)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "-n", "--forceall", *args],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", log):
        header = re.match(r"(local)?rule (\w+):\n", block)
        if not header or header.group(2) == "all":
            continue
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        line = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = _Resources()
        for item in line.group(1).split(", ") if line else []:
            key, _, value = item.partition("=")
            resources[key] = int(value) if value.isdigit() else value
        found = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        wildcards = dict(item.partition("=")[::2] for item in found.group(1).split(", ")) if found else {}
        jobs.append({"rule": header.group(2), "local": header.group(2) in local_rules(),
                     "threads": int(threads.group(1)) if threads else 1, "resources": resources,
                     "wildcards": wildcards})  # fmt: skip
    assert jobs, log[-4000:]
    return jobs


def sbatch_line(job: dict[str, Any]) -> str:
    """The plugin's sbatch call for a planned job (account/partition as run_job formats them)."""
    fake = SimpleNamespace(threads=job["threads"], resources=job["resources"])
    resources = job["resources"]
    params = {"run_uuid": "uuid", "slurm_logfile": "logs/slurm/%j.log", "comment_str": f"rule_{job['rule']}",
              "account": f" -A {shlex.quote(resources['slurm_account'])}",
              "partition": f" -p {shlex.quote(resources['slurm_partition'])}",
              "workdir": str(ROOT)}  # fmt: skip
    return get_submit_command(fake, params) + set_gres_string(fake)


def gpu_flags(line: str) -> list[str]:
    return re.findall(r"--(?:gpus|gres)=\S+", line)


def test_a_job_without_gpus_gets_no_gpu_flag() -> None:
    jobs = [j for j in planned_jobs("config/demo.yaml") if not j["local"]]
    assert {j["rule"] for j in jobs} >= GPU_RULES
    for job in jobs:
        line = sbatch_line(job)
        assert gpu_flags(line) == [], f"{job['rule']}: {line}"
        assert " -A acct" in line and " -p gpu" in line and f"--mem {job['resources']['mem_mb']}" in line


def test_the_old_profile_behaviour_is_what_this_guards_against() -> None:
    """A gpu_model set for a 0-GPU job (the profile used to set it for every GPU rule) does
    give `--gpus=a100:0`: the plugin itself does not drop it, so the rules must not set it."""
    resources = _Resources(gpu=0, gpu_model="a100", mem_mb=1000, slurm_account="a", slurm_partition="p")
    job = {"rule": "prune", "threads": 2, "resources": resources}
    assert gpu_flags(sbatch_line(job)) == ["--gpus=a100:0"]


@pytest.mark.parametrize(
    ("env", "flag"),
    [({}, "--gpus=a100:{n}"), ({"DENOISEROTATOR_GPU_MODEL": ""}, "--gpus={n}"),
     ({"DENOISEROTATOR_GPU_MODEL": "h100"}, "--gpus=h100:{n}"),
     ({"DENOISEROTATOR_GPU_FLAG": "gres"}, "--gres=gpu:a100:{n}")],
)  # fmt: skip
def test_paper_grid_gpu_jobs_get_one_gpu_flag(env: dict[str, str], flag: str) -> None:
    jobs = planned_jobs(None, **env)
    submitted = [j for j in jobs if not j["local"]]
    local = {j["rule"] for j in jobs if j["local"]}
    assert local >= {"fetch_model", "fetch_dataset", "tables"} and not local & GPU_RULES
    counts = {}
    for job in submitted:
        line = sbatch_line(job)
        gpu_count = job["resources"].get("gpu", 0)
        if job["rule"] in GPU_RULES:
            n = int(re.search(r"--(?:gpus|gres)=\S*?(\d+)$", gpu_flags(line)[0]).group(1))
            assert gpu_flags(line) == [flag.format(n=n)], f"{job['rule']}: {line}"
            counts.setdefault(job["rule"], set()).add(n)
            assert n == expected_gpus(job), f"{job['rule']} {job['wildcards']}: {line}"
            if "gres" in flag:
                assert gpu_count == 0  # a gpu count as well would add --gpus
        else:
            assert gpu_flags(line) == [], f"{job['rule']}: {line}"
    # each GPU job asks what costs.gpus sizes for its row (zero-shot of the 32B and dense 70B/72B
    # models: 2; rotated 70B/72B rows, with their fp32 boundaries: 3); no LoRA rows in the paper
    # config, so no finetune job
    assert set(counts) == GPU_RULES - {"finetune"} and counts["zeroshot"] == {1, 2, 3}


def expected_gpus(job: dict[str, Any]) -> int:
    exp = costs.load_experiment(str(ROOT / "config/config.yaml"))
    wildcards = job["wildcards"]
    if "row" in wildcards:
        row = Row.from_path(wildcards["row"])
        return costs.gpus(exp, row.model, job["rule"], row.rotation == "denoise")
    return costs.gpus(exp, wildcards["model"], job["rule"], not wildcards["variant"].endswith("_none"))


def test_gpu_request_refuses_an_unknown_route() -> None:
    with pytest.raises(ValueError, match="DENOISEROTATOR_GPU_FLAG"):
        costs.gpu_request(1, {"DENOISEROTATOR_GPU_FLAG": "gpu"})
    none = {"gpu": 0, "gpu_model": "", "gres": ""}
    assert costs.gpu_request(0, {"DENOISEROTATOR_GPU_FLAG": "gres"}) == none


def test_time_requests_stay_within_the_partitions_limit() -> None:
    """With DENOISEROTATOR_MAX_RUNTIME=2160 (a 36 h MaxTime) no sbatch line asks for more, although
    the 70B rotate+prune jobs are modelled at over 40 h: they run as two resuming attempts, which
    the profile's one retry allows. Without the limit those jobs ask for their whole estimate."""
    unlimited = [j for j in planned_jobs(None) if not j["local"]]
    assert max(j["resources"]["runtime"] for j in unlimited) > 2160
    jobs = [j for j in planned_jobs(None, DENOISEROTATOR_MAX_RUNTIME="2160") if not j["local"]]
    assert len(jobs) == len(unlimited)
    for job in jobs:
        line = sbatch_line(job)
        minutes = int(re.search(r" -t (\d+)", line).group(1))  # type: ignore[union-attr]
        assert minutes <= 2160, f"{job['rule']}: {line}"
    assert sum(j["resources"]["runtime"] == 2160 for j in jobs) == sum(
        j["resources"]["runtime"] > 2160 for j in unlimited
    )


def test_the_prune_rule_reserves_its_resuming_attempts_and_one_retry_for_failures(tmp_path: Path) -> None:
    """At a 1-day limit the 70B rotate+prune jobs need three resuming attempts. The profile's one
    retry used to be shared between them and every other failure (the plan stopped, asking for
    more); the prune rule now reserves its attempts plus one retry for a node failure, with the limit
    from the variables or from the partition file."""
    from denoiserotator.plan import jobs as plan
    from denoiserotator.plan.cluster import Partition, Site

    exp = costs.load_experiment(str(ROOT / "config/config.yaml"))
    limits = {2880: 1, 2160: 2, 1440: 3}
    for minutes, retries in limits.items():
        assert plan.prune_retries(exp, Site((Partition("gpu", minutes),), "test"), 1) == retries
    assert (
        plan.prune_retries(exp, Site((Partition("gpu", 2880),), "test"), 4) == 4
    )  # --retries still raises it

    environ = {k: v for k, v in os.environ.items() if not k.startswith("DENOISEROTATOR_")}
    environ.update(SLURM_ACCOUNT="acct", DENOISEROTATOR_MAX_RUNTIME="1440")
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "-n", "--forceall",
               "results/tables/main.csv"]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    site = tmp_path / "site.yaml"
    site.write_text("partitions:\n  gpu:\n    max_runtime: 1440\n    max_gpu: 8\n")
    del environ["DENOISEROTATOR_MAX_RUNTIME"]
    proc = subprocess.run(command, cwd=ROOT, env={**environ, "SNAKEMAKE_SLURM_PARTITIONS": str(site)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
