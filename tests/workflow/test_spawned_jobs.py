"""A job as SLURM runs it: the plugin's real sbatch call captured, its command run as a compute node
would run it (remote mode, `--retries 0 --attempt 1`, the limits exported), without SLURM.

The planning process submits one rotated 70B prune job of the paper grid with
DENOISEROTATOR_MAX_RUNTIME=2160 (a job that needs two resuming attempts) to a fake `sbatch` that
records its arguments; the recorded `--wrap` command then runs with a fake `srun` that executes
what it is given. The job must get past Snakemake's re-evaluation of the rule's resources and reach
the prune script (whose log it opens), where loading the placeholder model fails; before the fix
the resource callable raised ResourceLimitError there, a minute into every such job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from denoiserotator.plan import costs

pytest.importorskip("snakemake_executor_plugin_slurm")
pytest.importorskip("snakemake_executor_plugin_slurm_jobstep")

from tests.conftest import ROOT

FAKE_SBATCH = """#!/bin/sh
printf '%s\\n' "$@" > "$CAPTURE_DIR/sbatch.args"
echo 4242
"""
FAKE_SRUN = """#!/bin/sh
# a compute node's srun: drop srun's own options, run the command
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
exec "$@"
"""


def _fake_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir()
    scripts = {"sbatch": FAKE_SBATCH, "srun": FAKE_SRUN, "sacctmgr": "#!/bin/sh\necho acct\n"}
    for name in ("sacct", "squeue", "sinfo", "scontrol", "scancel"):
        scripts[name] = "#!/bin/sh\nexit 0\n"
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def _rotated_70b_prune_job() -> tuple[str, str, str]:
    exp = costs.load_experiment(str(ROOT / "config/config.yaml"))
    row = next(r for r in exp.rows() if r.model == "llama3-70b" and r.rotation == "denoise")
    return row.model, row.calib, row.variant  # type: ignore[return-value]


@pytest.mark.slow
def test_a_spawned_prune_job_that_needs_resuming_attempts_reaches_the_prune_script(tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, workdir / name)
    (workdir / "slurm").symlink_to("profiles/slurm")
    _fake_slurm(tmp_path / "bin")
    model, calib, variant = _rotated_70b_prune_job()
    (workdir / f"resources/models/{model}").mkdir(parents=True)
    (workdir / f"resources/models/{model}/config.json").write_text("{}")
    (workdir / f"results/calib/{model}").mkdir(parents=True)
    (workdir / f"results/calib/{model}/{calib}.pt").write_bytes(b"")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DENOISEROTATOR_", "SLURM_"))}
    env.update(
        PATH=os.pathsep.join([str(tmp_path / "bin"), str(Path(sys.executable).parent), env["PATH"]]),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
        CAPTURE_DIR=str(tmp_path), SLURM_ACCOUNT="acct", DENOISEROTATOR_MAX_RUNTIME="2160",
    )  # fmt: skip
    target = f"results/models/{model}/{calib}/{variant}/stats.json"
    planner = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", target],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    captured = tmp_path / "sbatch.args"
    deadline = time.monotonic() + 240
    while not captured.exists() and planner.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    planner.kill()
    planned = planner.communicate()[0]
    assert captured.exists(), planned[-4000:]
    args = captured.read_text().splitlines()
    assert args[args.index("-t") + 1] == "2160", args  # the attempt asks for the limit
    assert "--signal=TERM@900" in args, args  # time to checkpoint before the limit (preemption)
    command = next(a for a in args if a.startswith("--wrap=")).removeprefix("--wrap=")
    assert "--mode 'remote'" in command and "--retries 0" in command and "--attempt 1" in command

    env.update(SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="8")
    job = subprocess.run(
        ["sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    job_log = job.stdout + job.stderr
    assert "ResourceLimitError" not in job_log, job_log[-4000:]
    prune_log = workdir / f"results/logs/prune/{model}/{calib}/{variant}.log"
    # the prune script opened its log and failed where it reads the placeholder model
    assert prune_log.exists(), job_log[-4000:]
    assert "Traceback" in prune_log.read_text() or "Error" in prune_log.read_text(), prune_log.read_text()[
        -2000:
    ]
