"""The tiny workflow through the SLURM executor on a real (local, single-node) SLURM cluster.

Run by `make test-slurm` (.ci/slurm/test-slurm.sh), which starts the cluster first; the
`slurm` marker keeps these tests out of `make test`. What is checked is what SLURM itself
recorded (`sacct`), not what Snakemake says it asked for:

1. every submitted job ran under the account from the environment with exactly the memory,
   CPUs and GPUs (count and model) its rule declared, GPU rules really got a GPU, and jobs were
   routed by kind (the site's partition file: CPU-only jobs in the CPU partition);
2. a second invocation submits nothing;
3. changing one parameter (rotation steps) resubmits exactly the jobs that depend on it;
4. a prune job longer than its partition's MaxTime is stopped by SLURM, checkpoints on SIGTERM,
   resumes in the next attempt and ends with weights identical to an uninterrupted run;
5. a memory request too small for its job fails visibly (the step is killed, sacct says so).

The cluster tests share one copy of the repository and run in order (each builds on the last).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CONFIG = "config/test.yaml"
TARGETS: list[str] = ["results/tables/main.csv"]
ACCOUNT = os.environ.get("SLURM_ACCOUNT", "pruning")
GPU_MODEL = os.environ.get("DENOISEROTATOR_GPU_MODEL", "a100")
# per Snakemake call; the SLURM plugin can poll forever when status is unavailable
SNAKEMAKE_TIMEOUT_S = int(os.environ.get("SLURM_TEST_SNAKEMAKE_TIMEOUT", "600"))

# One parameter change, as a config overlay merged over config/test.yaml: more rotation steps.
# It must resubmit exactly the jobs of rotated rows (their paths carry the rotation settings'
# hash "dr-<8 hex>") and the tables that collect them; nothing of the dense, unrotated or
# calibration side.
CHANGE: dict = {"rotation": {"steps": 4}}
AGGREGATE_RULES = {"tables"}
ROTATION_HASH = re.compile(r"dr-[0-9a-f]{8}")


def affected_by_change(job: SubmittedJob) -> bool:
    return job.rule in AGGREGATE_RULES or bool(ROTATION_HASH.search(job.wildcards))


def job_key(job: SubmittedJob) -> tuple[str, str]:
    """A job's identity with the rotation hash blanked (it is what the change renames)."""
    return job.rule, ROTATION_HASH.sub("dr-*", job.wildcards)


# The local cluster's partitions (.ci/slurm/start-local-slurm.sh), stated once for the plugin and
# the workflow: GPU jobs to "gpu", CPU-only jobs (calibrate, sparsity) to "debug".
SITE = {"partitions": {"gpu": {"max_gpu": 2, "available_gpu_models": [GPU_MODEL or "a100"]},
                       "debug": {"max_gpu": 0}}}  # fmt: skip
CPU_RULES = {"calibrate", "sparsity"}

# Poll quickly: the default first status check comes after 40 s, then every 10+ s.
TEST_PROFILE = {
    "slurm-init-seconds-before-status-checks": 1,
    "seconds-between-status-checks": 1,
}


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None or shutil.which("sacct") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return "UP" in out.stdout


@dataclass
class SubmittedJob:
    rule: str
    slurm_id: str
    mem_mb: int
    gpu: int
    gpu_model: str | None
    threads: int
    wildcards: str


@dataclass
class Run:
    returncode: int
    log: str
    jobs: list[SubmittedJob]


def parse_submissions(log: str) -> list[SubmittedJob]:
    """Jobs Snakemake sent to SLURM, with the resources it printed for each."""
    blocks: dict[str, dict] = {}
    current: dict | None = None
    for line in log.splitlines():
        header = re.match(r"^(local)?rule (\w+):$", line.strip())
        if header:
            current = {"rule": header.group(2), "threads": 1, "wildcards": ""}
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("jobid:"):
            blocks[stripped.split()[1]] = current
        elif stripped.startswith("wildcards:"):
            current["wildcards"] = stripped[len("wildcards:") :].strip()
        elif stripped.startswith("threads:"):
            current["threads"] = int(stripped.split()[1])
        elif stripped.startswith("resources:"):
            res = stripped[len("resources:") :]
            mem = re.search(r"\bmem_mb=(\d+)", res)
            gpu = re.search(r"\bgpu=(\d+)", res)
            model = re.search(r"\bgpu_model=([\w.]+)", res)
            current["mem_mb"] = int(mem.group(1)) if mem else None
            current["gpu"] = int(gpu.group(1)) if gpu else 0
            current["gpu_model"] = model.group(1) if model else None
    jobs = []
    for sm_id, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log):
        b = blocks[sm_id]
        jobs.append(
            SubmittedJob(
                **{k: b[k] for k in ("rule", "mem_mb", "gpu", "gpu_model", "threads", "wildcards")},
                slurm_id=slurm_id,
            )
        )
    return jobs


def _tres_mb(value: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    return round(float(value[:-1]) * units[value[-1]]) if value[-1] in units else int(value)


def parse_tres(tres: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in tres.split(",") if "=" in item)


def sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """Allocation records (no steps) of the given jobs, as SLURM's accounting stored them."""
    fields = ["JobID", "State", "Account", "Partition", "ReqTRES", "AllocTRES", "Comment"]
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split("|", len(fields) - 1)
        if len(parts) == len(fields):
            rows[parts[0]] = dict(zip(fields, parts, strict=True))
    return rows


def account_job_count(since: str) -> int:
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-a", "-A", ACCOUNT, "-S", since, "-o", "JobID"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return len(out.split())


def _copy_repository(dest: Path) -> Path:
    """A copy of the working tree as git sees it (tracked + untracked, not ignored), so the test
    neither reads nor writes results/ of the checkout it runs from."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    (dest / ".test-profile").mkdir()
    (dest / ".test-profile" / "profile.yaml").write_text(yaml.safe_dump(TEST_PROFILE))
    (dest / "site.yaml").write_text(yaml.safe_dump(SITE))
    return dest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _cluster_up():
        message = "no SLURM controller answers `scontrol ping` (start .ci/slurm/start-local-slurm.sh)"
        if os.environ.get("DENOISEROTATOR_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    dest = _copy_repository(tmp_path_factory.mktemp("slurm-repo"))
    (dest / ".change.yaml").write_text(yaml.safe_dump(CHANGE))
    return dest


def snakemake(
    workdir: Path, *extra: str, targets: list[str] | None = None, config: str = CONFIG, **environ: str
) -> Run:
    """`snakemake --profile slurm` exactly as a user runs it, plus fast status polling, with the
    site's partition file in SNAKEMAKE_SLURM_PARTITIONS."""
    cmd = [
        "timeout", "-k", "30", str(SNAKEMAKE_TIMEOUT_S),
        sys.executable, "-m", "snakemake", "--profile", "slurm", "--profile", ".test-profile",
        *(TARGETS if targets is None else targets), "--configfile", config, *extra,
    ]  # fmt: skip
    # the test config computes on the CPU but requests compute.gpus (1) GPUs per GPU rule, so
    # GPU scheduling on the (fake) GPUs is what gets tested
    env = dict(os.environ, SLURM_ACCOUNT=ACCOUNT, DENOISEROTATOR_GPU_MODEL=GPU_MODEL,
               SNAKEMAKE_SLURM_PARTITIONS=str(workdir / "site.yaml"), **environ)  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode in (124, 137):
        pytest.fail(f"snakemake did not finish within {SNAKEMAKE_TIMEOUT_S}s:\n{log[-6000:]}")
    return Run(proc.returncode, log, parse_submissions(log))


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> Run:
    run = snakemake(workdir)
    assert run.returncode == 0, run.log[-8000:]
    return run


@pytest.mark.slurm
def test_jobs_ran_with_declared_resources(first_run: Run) -> None:
    jobs = first_run.jobs
    assert jobs, "nothing was submitted to SLURM:\n" + first_run.log[-4000:]
    assert any(j.gpu > 0 for j in jobs), "the tiny workflow submitted no GPU job"
    records = sacct([j.slurm_id for j in jobs])
    for job in jobs:
        rec = records.get(job.slurm_id)
        assert rec is not None, f"job {job.slurm_id} ({job.rule}) missing from sacct"
        where = f"job {job.slurm_id} (rule {job.rule})"
        assert rec["State"] == "COMPLETED", f"{where}: {rec}"
        assert rec["Account"] == ACCOUNT, f"{where}: {rec}"
        # the plugin's comment names the rule: ties the SLURM record to the Snakemake job
        assert rec["Comment"].startswith(f"rule_{job.rule}"), f"{where}: {rec}"
        # routed by kind by the site's partition file
        assert rec["Partition"] == ("debug" if job.rule in CPU_RULES else "gpu"), f"{where}: {rec}"
        for column in ("ReqTRES", "AllocTRES"):
            tres = parse_tres(rec[column])
            assert job.mem_mb is not None, f"{where} declared no mem_mb"
            assert _tres_mb(tres["mem"]) == job.mem_mb, f"{where} {column}: {rec[column]}"
            assert int(tres["cpu"]) >= job.threads, f"{where} {column}: {rec[column]}"
            assert int(tres.get("gres/gpu", 0)) == job.gpu, f"{where} {column}: {rec[column]}"
            if job.gpu:
                # the GPU model comes from the environment (DENOISEROTATOR_GPU_MODEL)
                assert job.gpu_model == (GPU_MODEL or None), f"{where}: gpu_model {job.gpu_model}"
                if GPU_MODEL:
                    assert int(tres.get(f"gres/gpu:{GPU_MODEL}", 0)) == job.gpu, f"{where}: {rec[column]}"


@pytest.mark.slurm
def test_second_invocation_submits_nothing(workdir: Path, first_run: Run) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    time.sleep(1)
    run = snakemake(workdir)
    assert run.returncode == 0, run.log[-8000:]
    assert run.jobs == [], f"resubmitted: {[j.rule for j in run.jobs]}\n{run.log[-4000:]}"
    assert "Nothing to be done" in run.log, run.log[-4000:]
    assert account_job_count(since) == 0


@pytest.mark.slurm
def test_changed_parameter_resubmits_only_affected_jobs(workdir: Path, first_run: Run) -> None:
    expected = sorted(job_key(j) for j in first_run.jobs if affected_by_change(j))
    unaffected = [j for j in first_run.jobs if not affected_by_change(j)]
    assert expected and unaffected, "the change must split the tiny workflow's jobs"
    run = snakemake(workdir, "--configfile", CONFIG, ".change.yaml")
    assert run.returncode == 0, run.log[-8000:]
    got = sorted(job_key(j) for j in run.jobs)
    extra = [k for k in got if k not in expected]
    missing = [k for k in expected if k not in got]
    assert got == expected, f"resubmitted but unaffected: {extra}\nnot resubmitted: {missing}"
    # the rotated rows really are new ones (new settings hash), not the old paths again
    old_hashes = {h for j in first_run.jobs for h in ROTATION_HASH.findall(j.wildcards)}
    new_hashes = {h for j in run.jobs for h in ROTATION_HASH.findall(j.wildcards)}
    assert new_hashes and not new_hashes & old_hashes
    records = sacct([j.slurm_id for j in run.jobs])
    assert all(records[j.slurm_id]["State"] == "COMPLETED" for j in run.jobs), records
    # and after that, nothing is left to do again
    again = snakemake(workdir, "--configfile", CONFIG, ".change.yaml")
    assert again.returncode == 0 and again.jobs == [], again.log[-4000:]


# A prune job longer than the "short" partition's MaxTime (1 min): six tiny layers of ~15 s of
# rotation each (10000 steps, no stopping rule), no checkpoint due by count or time, so only the
# SIGTERM SLURM sends at the limit saves progress (KillWait 30 s before SIGKILL).
LONG_PRUNE = {
    "models": [{"slug": "tiny-llama", "source": "tiny:llama", "paper_name": None, "params_b": 0.001,
                "num_layers": 6, "resources": {"prune": {"runtime": 1}}}],
    "dense": False, "pruners": ["wanda"], "patterns": ["50%"], "rotations": ["denoise"],
    "rotation_only": False, "finetune": {"rows": []},
    "rotation": {"steps": 10000, "tol": 0.0, "backoff": 0, "rise_limit": 1.0e9},
    "compute": {"checkpoint_every_layers": 0, "checkpoint_every_minutes": 0},
}  # fmt: skip
SHORT = {"max_runtime": 1, "max_gpu": 2, "available_gpu_models": [GPU_MODEL or "a100"]}
SHORT_SITE = {"partitions": {"short": SHORT, "debug": {"max_gpu": 0}}}


def _long_prune_workdir(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, str]:
    from denoiserotator.plan.costs import load_experiment

    dest = _copy_repository(tmp_path_factory.mktemp(name))
    config = yaml.safe_load((dest / CONFIG).read_text())
    merged = {section: {**config[section], **LONG_PRUNE[section]} for section in ("rotation", "compute")}
    config.update({**LONG_PRUNE, **merged})
    (dest / "long.yaml").write_text(yaml.safe_dump(config))
    (dest / "site.yaml").write_text(yaml.safe_dump(SHORT_SITE))
    exp = load_experiment(str(dest / "long.yaml"))
    (row,) = [r for r in exp.rows() if r.prune_dir]
    return dest, f"{row.prune_dir}/stats.json"


@pytest.mark.slurm
def test_a_prune_job_over_maxtime_resumes_over_attempts_to_identical_weights(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if not _cluster_up():
        pytest.skip("no SLURM controller")
    workdir, target = _long_prune_workdir(tmp_path_factory, "slurm-long")
    # the signal SLURM sends at the time limit itself, not the profile's 15 min ahead of it
    run = snakemake(
        workdir, "--retries", "5", targets=[target], config="long.yaml", DENOISEROTATOR_SIGNAL_SECONDS="0"
    )
    assert run.returncode == 0, run.log[-8000:]
    prunes = [j for j in run.jobs if j.rule == "prune"]
    records = sacct([j.slurm_id for j in prunes])
    states = [records[j.slurm_id]["State"] for j in prunes]
    assert len(prunes) >= 2 and states[0] == "TIMEOUT" and states[-1] == "COMPLETED", states
    assert all(records[j.slurm_id]["Partition"] == "short" for j in prunes)
    # no checkpoint is ever due: the one the retry resumes from was written on SLURM's SIGTERM
    prune_log = next((workdir / "results/logs/prune").rglob("*.log")).read_text()
    assert re.search(r"resuming after layer [0-4] ", prune_log), prune_log[-3000:]

    reference, _ = _long_prune_workdir(tmp_path_factory, "local-long")
    command = [sys.executable, "-m", "snakemake", target, "--cores", "2", "--configfile", "long.yaml"]
    local = subprocess.run(command, cwd=reference, capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    weights = Path(target).parent / "hf" / "model.safetensors"
    assert (workdir / weights).read_bytes() == (reference / weights).read_bytes()


@pytest.mark.slurm
def test_a_memory_request_too_small_fails_visibly(workdir: Path, first_run: Run) -> None:
    """SLURM enforces --mem (OverMemoryKill, no cgroups needed): a calibration job asking for 60 MB
    is killed, and both Snakemake and sacct say it failed."""
    from denoiserotator.plan.costs import load_experiment

    exp = load_experiment(str(workdir / CONFIG))
    target = f"results/calib/tiny-llama/{exp.calib_id()}.pt"
    small = ("--forcerun", "calibrate", "--retries", "0", "--set-resources", "calibrate:mem_mb=60")
    run = snakemake(workdir, *small, targets=[target], config=CONFIG)
    assert run.returncode != 0, run.log[-4000:]
    (job,) = [j for j in run.jobs if j.rule == "calibrate"]
    assert job.mem_mb == 60
    assert sacct([job.slurm_id])[job.slurm_id]["State"] in {"FAILED", "OUT_OF_MEMORY"}, run.log[-4000:]
    # the checkout is left as the later tests expect it: the calibration rebuilt with its request
    assert snakemake(workdir, targets=[target], config=CONFIG).returncode == 0


def _profile(**env: str) -> dict:
    import yte

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with open(ROOT / "profiles" / "slurm" / "profile.yaml") as f:
            return yte.process_yaml(f, require_use_yte=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_gpu_rules_declare_count_model_and_gres_together() -> None:
    """Runs in `make test`: every rule with a gpu count also declares gpu_model and gres from the
    same request (costs.gpu_request), and the profile sets no GPU resource of its own (a
    profile-wide gpu_model gave 0-GPU jobs `--gpus=a100:0`; tests/workflow/test_sbatch.py)."""
    gpu_rules = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"^(?=rule |localrule )", smk.read_text(), flags=re.M):
            name = re.match(r"(?:local)?rule (\w+):", block)
            if name and re.search(r"^\s+gpu\s*=", block, flags=re.M):
                gpu_rules.add(name.group(1))
                for key in ("gpu_model", "gres"):
                    declared = rf'^\s+{key}=get_resource\("\w+", "{key}"\),$'
                    assert re.search(declared, block, flags=re.M), (name.group(1), key)
    assert gpu_rules, "no rule declares a gpu resource"
    profile = _profile(DENOISEROTATOR_GPU_MODEL="a100", SLURM_ACCOUNT="acct", SLURM_PARTITION="")
    assert "set-resources" not in profile
    assert profile["default-resources"]["slurm_account"] == "acct"
    assert profile["default-resources"]["slurm_partition"] is None
    assert profile["executor"] == "slurm"
    assert (ROOT / "slurm").resolve() == (ROOT / "profiles" / "slurm").resolve()
