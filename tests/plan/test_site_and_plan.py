"""The site, stated once (the SLURM plugin's partition file), and the plan check: every job of the
paper grid is routed to a partition that holds it, capped there, or refused at planning, and
`python -m denoiserotator.plan` prints the same requests the workflow makes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from denoiserotator.plan import costs
from denoiserotator.plan import jobs as plan
from denoiserotator.plan.cluster import Partition, Site, SiteError
from denoiserotator.plan.experiment import Row
from tests.conftest import ROOT
from tests.plan.test_experiment import load
from tests.workflow.test_sbatch import planned_jobs, sbatch_line

SITE_48H = ROOT / "config" / "sites" / "a100-48h.yaml"  # 48 h, 1 TB nodes, 8 × A100-80G, CPU partition
SMALL_SITE = """\
partitions:
  gpu:
    max_runtime: "1-00:00:00"
    max_mem_mb: 200000
    max_gpu: 2
    available_gpu_models: [a100-40g]
"""


def paper() -> costs.Experiment:
    return costs.Experiment(load("config.yaml"))


def test_a_partition_file_is_read_as_the_plugin_writes_it(tmp_path: Path) -> None:
    site = Site.from_file(SITE_48H)
    gpu, cpu = site.partitions
    assert (gpu.name, gpu.max_runtime, gpu.max_mem_mb, gpu.max_gpu, gpu.gpu_memory_gib) == (
        "gpu",
        2880,
        1000000,
        8,
        80,
    )
    assert (cpu.name, cpu.max_gpu, cpu.has_gpus) == ("cpu", 0, False)
    assert site.candidates(gpus=False) == [cpu, gpu] and site.candidates(gpus=True) == [gpu]
    # read as the plugin reads the same file (its parse_time_to_minutes): "60:30" is 60 h 30 min
    times = (("2-00:00:00", 2880), ("1-12", 2160), ("90", 90), ("01:30:00", 90), (600, 600), ("12h", 720),
             ("60:30", 3630))  # fmt: skip
    for text, minutes in times:
        path = tmp_path / "site.yaml"
        path.write_text(f"partitions:\n  p:\n    max_runtime: {text!r}\n")
        assert Site.from_file(path).partitions[0].max_runtime == minutes
    for bad, named in (("max_runtime: two days", "max_runtime"), ("max_gpu: -1", "max_gpu"),
                       ("max_mem_mb: lots", "max_mem_mb")):  # fmt: skip
        path.write_text(f"partitions:\n  p:\n    {bad}\n")
        with pytest.raises(SiteError, match=rf"partitions\.p: {named}"):
            Site.from_file(path)
    path.write_text("gpu: {}\n")
    with pytest.raises(SiteError, match="partitions"):
        Site.from_file(path)


def test_the_environment_names_the_site_or_the_older_limits(tmp_path: Path) -> None:
    assert Site.from_environment({"SNAKEMAKE_SLURM_PARTITIONS": str(SITE_48H)}).source == str(SITE_48H)
    legacy = Site.from_environment({"DENOISEROTATOR_MAX_RUNTIME": "1440", "SLURM_PARTITION": "big"})
    assert legacy.partitions == (Partition("big", 1440, None, None, "a100"),)
    with pytest.raises(SiteError, match="DENOISEROTATOR_MAX_MEM_MB"):
        Site.from_environment({"DENOISEROTATOR_MAX_MEM_MB": "250GB"})


def test_jobs_are_routed_by_kind_and_capped_by_their_partition() -> None:
    exp, site = paper(), Site.from_file(SITE_48H)
    calibrate = costs.job_request(exp, "llama3-70b", "calibrate", site=site)
    sparsity = costs.job_request(exp, "llama3-70b", "sparsity", rotated=True, site=site)
    zeroshot = costs.job_request(exp, "llama3-70b", "zeroshot", rotated=True, site=site)
    prune = costs.job_request(exp, "llama3-70b", "prune", True, "sparsegpt_50pct_dr-0", site=site, retries=1)
    assert (calibrate.partition.name, calibrate.gpus) == ("cpu", 0) and sparsity.partition.name == "cpu"
    assert (zeroshot.partition.name, zeroshot.gpus) == ("gpu", 3)  # 141 GB bf16 + 21 GB fp32 boundaries
    assert prune.partition.name == "gpu" and prune.runtime <= 2880 and prune.attempts == 1
    assert (
        zeroshot.resources({})["slurm_partition"] == "gpu" and zeroshot.resources({})["gpu_model"] == "a100"
    )
    # the calibration's request grows with the attempt (it was a constant 4000 MB)
    assert (
        costs.job_request(exp, "llama3-70b", "calibrate", attempt=2, site=site).mem_mb == 2 * calibrate.mem_mb
    )
    # a retry asks for more, but never more than the partition's limits
    retried = costs.job_request(
        exp, "llama3-70b", "prune", True, "sparsegpt_50pct_dr-0", attempt=2, site=site
    )
    assert retried.runtime == 2880 and retried.mem_mb == 2 * prune.mem_mb <= 1000000
    # a shorter limit: the prune job resumes over attempts, which the retries must allow
    short = Site((Partition("gpu", 1440, 1000000, 8),), "test")
    assert (
        costs.job_request(exp, "llama3-70b", "prune", True, "sparsegpt_50pct_dr-0", site=short).attempts == 3
    )
    with pytest.raises(
        costs.ResourceLimitError, match=r"prune job of llama3-70b .*3 attempts of 1440 min.*--retries 2"
    ):
        costs.job_request(exp, "llama3-70b", "prune", True, "sparsegpt_50pct_dr-0", site=short, retries=1)


def test_a_job_no_partition_holds_is_refused_with_each_reason(tmp_path: Path) -> None:
    exp = paper()
    (tmp_path / "small.yaml").write_text(SMALL_SITE)
    site = Site.from_file(tmp_path / "small.yaml")
    with pytest.raises(
        costs.ResourceLimitError,
        match=r"zeroshot job of qwen2.5-72b .*needs 5 GPU\(s\) of 40 GiB, more than its 2",
    ):
        costs.job_request(exp, "qwen2.5-72b", "zeroshot", site=site)
    with pytest.raises(
        costs.ResourceLimitError, match=r"≈ 45 GiB of GPU memory, more than one a100-40g \(40 GiB\)"
    ):
        costs.job_request(exp, "llama3-70b", "prune", True, "wanda_50pct_dr-0",
                          site=Site((Partition("gpu", None, None, 8, "a100-40g"),), "test"))  # fmt: skip


def test_the_plan_check_finds_no_job_over_a_48h_80gb_8gpu_1tb_site() -> None:
    proc = subprocess.run([sys.executable, "-m", "denoiserotator.plan", "--site", str(SITE_48H)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\n0 job(s) do not fit the site\n" in proc.stdout
    assert "| zeroshot | llama3-70b | 20 | gpu | 2–3 |" in proc.stdout
    assert "| calibrate | llama3-70b | 1 | cpu | 0 |" in proc.stdout
    result = plan.plan(paper(), Site.from_file(SITE_48H), retries=1)
    assert f"{result.gpu_hours:.0f} GPU-hours asked" in proc.stdout and result.gpu_hours > 1000
    # the disk the grid's folders take (fp32 rows stay fp32: rotation-only = dense holds to 1e-5)
    assert f"{result.folder_bytes / 1e12:.1f} TB of model folders written" in proc.stdout
    assert 10e12 < result.folder_bytes < 13e12


def test_the_plan_check_lists_what_a_small_site_cannot_run(tmp_path: Path) -> None:
    (tmp_path / "small.yaml").write_text(SMALL_SITE)
    command = [sys.executable, "-m", "denoiserotator.plan", "--site", str(tmp_path / "small.yaml")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    refused = [line for line in proc.stdout.splitlines() if line.startswith("  - ")]
    assert refused and f"\n{len(refused)} job(s) do not fit the site\n" in proc.stdout
    assert any(line.startswith("  - zeroshot qwen2.5-72b/dense: ") for line in refused)
    assert any(line.startswith("  - prune results/models/llama3-70b/") for line in refused)
    assert not any(" llama3.2-1b" in line or "/llama3.2-1b/" in line for line in refused)


@pytest.mark.workflow
def test_the_plan_is_the_workflows_and_the_workflow_refuses_at_planning(tmp_path: Path) -> None:
    """`snakemake --profile slurm -n` with the partition file: every submitted job has the
    partition and requests `costs.job_request` gives (CPU jobs on the CPU partition), the plan
    counts the same jobs per rule, and a site too small stops the plan before submission."""
    jobs = [j for j in planned_jobs(None, SNAKEMAKE_SLURM_PARTITIONS=str(SITE_48H)) if not j["local"]]
    exp, site = costs.load_experiment(str(ROOT / "config/config.yaml")), Site.from_file(SITE_48H)
    for job in jobs:
        wildcards = job["wildcards"]
        if "row" in wildcards:
            row = Row.from_path(wildcards["row"])
            model, rotated, variant = row.model, row.rotation == "denoise", None
        else:
            model, variant = wildcards["model"], wildcards.get("variant")
            rotated = variant is not None and not variant.endswith("_none")
        expected = costs.job_request(exp, model, job["rule"], rotated, variant, 1, site).resources({})
        got = {
            key: job["resources"].get(key, 0 if key == "gpu" else "")
            for key in ("slurm_partition", "mem_mb", "runtime", "gpu")
        }
        assert got == {key: expected[key] for key in got}, (job["rule"], wildcards)
        line = sbatch_line(job)
        assert f" -p {'cpu' if job['rule'] in ('calibrate', 'sparsity') else 'gpu'} " in line, line
    assert Counter(j["rule"] for j in jobs) == Counter(j.step for j in plan.grid_jobs(exp))

    (tmp_path / "small.yaml").write_text(SMALL_SITE)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DENOISEROTATOR_")}
    environ.update(SLURM_ACCOUNT="acct", SNAKEMAKE_SLURM_PARTITIONS=str(tmp_path / "small.yaml"))
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "-n", "--forceall",
               "results/tables/main.csv"]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "fits no partition of the site" in proc.stdout + proc.stderr
