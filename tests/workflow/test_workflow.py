"""The real workflow on config/test.yaml (tiny random Llama, committed tiny corpus) in a temporary
copy of the repository's workflow files, then dry runs that prove the invalidation rules:

* a second run plans nothing;
* changing the rotation steps replans only rotated rows (their prune, evals) and the tables,
  never a dense or plain-pruning job;
* changing the zero-shot settings replans only zero-shot evaluations and the tables;
* config/demo.yaml merged over config/config.yaml plans exactly the demo grid, and the paper grid
  plans GPU jobs for its seven models.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles/default", "envs")
RUN_TIMEOUT_S = 1500


def _copy_workflow(dest: Path) -> Path:
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    return proc


def dry_run(workdir: Path, *args: str) -> tuple[dict[str, int], list[str]]:
    """Planned job counts per rule and every planned output path."""
    proc = snakemake(workdir, "-n", *args)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    counts: dict[str, int] = {}
    if "Job stats:" in log:
        table = log.split("Job stats:", 1)[1].split("\n\n", 1)[0]
        for line in table.splitlines()[3:]:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                counts[parts[0]] = int(parts[1])
    outputs = [p.strip() for line in re.findall(r"^\s+output: (.*)$", log, re.M) for p in line.split(",")]
    return counts, outputs


def _overlay(workdir: Path, name: str, payload: dict) -> str:
    (workdir / name).write_text(yaml.safe_dump(payload))
    return name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test workflow, run once for real."""
    dest = _copy_workflow(tmp_path_factory.mktemp("workflow"))
    # gpu=2: the test config requests a GPU per job (for the SLURM test); here two run side by side
    proc = snakemake(
        dest,
        "all",
        "--cores",
        "2",
        "--resources",
        "gpu=2",
        "--configfile",
        "config/test.yaml",
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    return dest


def test_main_table_has_the_grid(workdir: Path) -> None:
    table = pd.read_csv(workdir / "results/tables/main.csv")
    assert pd.read_parquet(workdir / "results/tables/main.parquet").shape == table.shape
    keys = sorted(map(tuple, table[["pruner", "pattern", "rotation", "finetune"]].astype(str).values))
    assert keys == sorted(
        [
            ("none", "dense", "none", "none"),  # dense
            ("wanda", "50%", "none", "none"),
            ("wanda", "50%", "denoise", "none"),
            ("none", "dense", "denoise", "none"),  # rotation only
            ("wanda", "50%", "denoise", "lora"),
        ]
    )
    assert set(table["model"]) == {"tiny-llama"}
    for column in (
        "measured_sparsity",
        "ppl_sotu",
        "piqa",
        "zeroshot_avg",
        "rotation_only_matches_dense",
        "piqa_stderr",
        "zeroshot_avg_stderr",
        "ppl_sotu_nll_stderr",
        "zeroshot_avg_within_noise",
    ):
        assert column in table.columns
    measured = ["measured_sparsity", "ppl_sotu", "piqa", "zeroshot_avg", "piqa_stderr", "zeroshot_avg_stderr"]
    assert table[measured].notna().all().all()
    pruned = table["pruner"] != "none"
    # 50% unstructured per output row on even widths: exactly half the weights, LoRA included
    assert (table.loc[pruned, "measured_sparsity"] == 0.5).all()
    assert (table.loc[~pruned, "measured_sparsity"] == 0.0).all()
    rot_only = (table["pruner"] == "none") & (table["rotation"] == "denoise")
    assert table.loc[rot_only, "rotation_only_matches_dense"].tolist() == [True]
    dense = table[(table["pruner"] == "none") & (table["rotation"] == "none")]
    assert table.loc[rot_only, "ppl_sotu"].iloc[0] == pytest.approx(dense["ppl_sotu"].iloc[0], rel=1e-3)
    for name in ("main.md", "ppl.png", "entropy.png", "zeroshot.png"):
        assert (workdir / "results/tables" / name).stat().st_size > 0


OFFLINE_LINE = "hub offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1"
COMPUTE_RULES = ("calibrate", "prune", "finetune", "perplexity", "zeroshot", "sparsity")


def test_compute_jobs_ran_with_the_hub_offline(workdir: Path) -> None:
    """Every compute job's log says it switched the hub offline (logs.offline, which refuses to
    run after a hub library was imported); the local fetch rules stay online."""
    for rule in COMPUTE_RULES:
        logs = list((workdir / "results/logs" / rule).rglob("*.log"))
        assert logs, rule
        for log in logs:
            assert OFFLINE_LINE in log.read_text(), log
    fetches = list((workdir / "results/logs/fetch_model").rglob("*.log"))
    assert fetches and not any(OFFLINE_LINE in log.read_text() for log in fetches)


def test_compute_job_with_a_missing_copy_names_it(tmp_path: Path) -> None:
    """Calibration on the hub's C4 reads resources/datasets/c4; a copy without the train shard
    fails the job with one line naming the file and the fetch rule."""
    from denoiserotator.plan.experiment import Experiment
    from tests.plan.test_experiment import load

    dest = _copy_workflow(tmp_path)
    overlay = _overlay(dest, "c4.yaml", {"calibration": {"source": "c4"}})
    (dest / "resources/datasets/c4/en").mkdir(parents=True)  # present, but without the train shard
    calib = Experiment(load("test.yaml", calibration={"source": "c4"})).calib_id()
    target = f"results/calib/tiny-llama/{calib}.pt"
    proc = snakemake(dest, target, "--cores", "1", "--configfile", "config/test.yaml", overlay)
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-4000:]
    log = (dest / f"results/logs/calibrate/tiny-llama/{calib}.log").read_text()
    expected = ("missing resources/datasets/c4/en/c4-train.00000-of-01024.json.gz: "
                "run the fetch_dataset rule on a machine with internet")  # fmt: skip
    assert expected in log and OFFLINE_LINE in log, log[-3000:]


def test_calibration_records_its_hash(workdir: Path) -> None:
    import json

    (meta,) = list((workdir / "results/calib/tiny-llama").glob("c-*.json"))
    assert re.fullmatch(r"[0-9a-f]{64}", json.loads(meta.read_text())["sha256"])


def test_second_run_plans_nothing(workdir: Path) -> None:
    counts, outputs = dry_run(workdir, "--configfile", "config/test.yaml")
    assert counts == {} and outputs == []


def test_an_unused_optimizers_knob_plans_nothing(workdir: Path) -> None:
    """The paper optimizer's Adam betas while `cayley` is selected: no id, no params, no table
    changes, so the dry run plans no job at all."""
    overlay = _overlay(workdir, "rotation-betas.yaml", {"rotation": {"betas": [0.8, 0.99]}})
    counts, outputs = dry_run(workdir, "--configfile", "config/test.yaml", overlay)
    assert counts == {} and outputs == []


@pytest.mark.parametrize("change", [{"steps": 7}, {"tangent_lr": 0.03}], ids=["steps", "tangent_lr"])
def test_rotation_setting_change_reruns_only_rotated_rows(workdir: Path, change: dict) -> None:
    overlay = _overlay(workdir, f"rotation-{next(iter(change))}.yaml", {"rotation": change})
    counts, outputs = dry_run(workdir, "--configfile", "config/test.yaml", overlay)
    full, _ = dry_run(workdir, "--configfile", "config/test.yaml", overlay, "--forceall")
    assert sum(counts.values()) < sum(full.values())
    # wanda+rotation, rotation-only, and the LoRA row built on wanda+rotation
    assert counts.get("prune") == 2 and counts.get("finetune") == 1
    assert counts.get("perplexity") == 3 and counts.get("zeroshot") == 3 and counts.get("sparsity") == 3
    assert "calibrate" not in counts and "fetch_model" not in counts
    for path in outputs:
        if path.startswith(("results/models/", "results/eval/")):
            assert "/dense/" not in path and "_none/" not in path, path
            assert "_dr-" in path, path


def test_the_refine_axis_plans_only_the_refined_rows(workdir: Path) -> None:
    """Claim: `refine: [none, swaps]` plans a refined copy of each pruned row (plain and
    rotated: two prune jobs, their evaluations) and reruns no existing row: every planned model
    or result path is a refined one, and the unrefined rows keep their files."""
    overlay = _overlay(workdir, "refine.yaml", {"refine": ["none", "swaps"]})
    counts, outputs = dry_run(workdir, "--configfile", "config/test.yaml", overlay)
    assert counts.get("prune") == 2 and "finetune" not in counts and "calibrate" not in counts
    assert counts.get("perplexity") == 2 and counts.get("sparsity") == 2 and counts.get("zeroshot") == 2
    planned = [p for p in outputs if p.startswith(("results/models/", "results/eval/"))]
    assert planned and all(re.search(r"_swaps-[0-9a-f]{8}/", p) for p in planned), planned
    # the refinement's knobs rename only refined rows: without them nothing would be planned
    again = _overlay(workdir, "refine-none.yaml", {"refinement": {"max_swaps": 3}})
    assert dry_run(workdir, "--configfile", "config/test.yaml", again) == ({}, [])


def test_zeroshot_change_reruns_only_zeroshot(workdir: Path) -> None:
    overlay = _overlay(workdir, "zs.yaml", {"eval": {"zeroshot": {"limit": 3}}})
    counts, _ = dry_run(workdir, "--configfile", "config/test.yaml", overlay)
    assert set(counts) == {"zeroshot", "tables", "all"}
    assert counts["zeroshot"] == 5


def test_zeroshot_rows_change_reruns_no_evaluation(workdir: Path) -> None:
    """Claim: narrowing eval.zeroshot.rows keeps the selected rows' results (not in the id, not in
    the rule's params): only the table is rebuilt."""
    overlay = _overlay(workdir, "zs-rows.yaml", {"eval": {"zeroshot": {"rows": ["wanda/50%/none"]}}})
    counts, _ = dry_run(workdir, "--configfile", "config/test.yaml", overlay)
    assert set(counts) <= {"tables", "all"} and counts["tables"] == 1


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_workflow(tmp_path_factory.mktemp("fresh"))


def test_demo_plans_exactly_the_demo_grid(fresh: Path) -> None:
    counts, outputs = dry_run(fresh, "results/tables/main.csv", "--configfile", "config/demo.yaml")
    # dense + 3 pruners x 2 patterns x 2 rotations + rotation-only + 1 LoRA row = 15 rows
    assert counts["prune"] == 13 and counts["finetune"] == 1
    assert counts["perplexity"] == counts["sparsity"] == 15
    # eval.zeroshot.rows: zero-shot on the Wanda 2:4 pair only (README, "The demo's table")
    assert counts["zeroshot"] == 2
    assert counts["fetch_model"] == 1 and counts["calibrate"] == 1 and counts["tables"] == 1
    models = {p.split("/")[2] for p in outputs if p.startswith(("results/models/", "results/eval/"))}
    assert models == {"smollm2-135m"}


def test_the_rotation_gain_study_plans_the_demos_pruning_grid_without_lora_or_zeroshot(fresh: Path) -> None:
    """config/studies/rotation-gain.yaml (docs/studies.md, "Does the rotation help?")."""
    overlay = ("config/demo.yaml", "config/studies/rotation-gain.yaml")
    counts, outputs = dry_run(fresh, "results/tables/main.csv", "--configfile", *overlay)
    assert counts["prune"] == 9 and counts["perplexity"] == counts["sparsity"] == 10
    assert "finetune" not in counts and "zeroshot" not in counts


def test_paper_grid_plans_gpu_jobs(fresh: Path) -> None:
    proc = snakemake(fresh, "-n", "results/tables/main.csv")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    counts, outputs = dry_run(fresh, "results/tables/main.csv")
    # the paper's eight models (its appendix tables include LLaMA-3.2-1B)
    assert counts["fetch_model"] == 8 and counts["prune"] == 8 * 19
    # C4, WikiText-2 and the lm-eval tasks: downloaded by local rules, read by the compute jobs
    assert counts["fetch_dataset"] == 3
    # 20 rows per model: dense, 3 pruners x 3 patterns (50%, 2:4, 4:8) x 2 rotations, rotation-only
    assert counts["perplexity"] == 8 * 20 * 2 and counts["zeroshot"] == 8 * 20
    assert any("_4-8_" in path for path in outputs) and any("/llama3.2-1b/" in path for path in outputs)
    prune_jobs = [block for block in log.split("\n\n") if re.search(r"^rule prune:", block.strip(), re.M)]
    assert prune_jobs and all("gpu=1" in block for block in prune_jobs)


NEW_FAMILIES = {"tiny-qwen3": "tiny:qwen3", "tiny-phi3": "tiny:phi3", "tiny-gemma3": "tiny:gemma3_text"}


def test_the_newer_families_run_through_the_workflow(tmp_path: Path) -> None:
    """Qwen3 (per-head q/k norms), Phi-3 (fused qkv_proj and gate_up_proj, partial rotary) and
    Gemma 3 (sandwich norms, 1 + γ scales, sliding/global layers) through the real workflow:
    the rotation-only row equals dense, 2:4 rows are exactly half zeros (LoRA included), and
    lm-eval runs on the rotated, fine-tuned folder."""
    workdir = _copy_workflow(tmp_path)
    overlay = _overlay(workdir, "families.yaml", {
        "models": [{"slug": slug, "source": source, "params_b": 0.001, "num_layers": 2}
                   for slug, source in NEW_FAMILIES.items()],
        "patterns": ["2:4"],
        "finetune": {"rows": [{"pruner": "wanda", "pattern": "2:4", "rotation": "denoise"}]},
        "eval": {"zeroshot": {"rows": ["wanda/2:4/denoise/lora"]}},
    })  # fmt: skip
    proc = snakemake(workdir, "results/tables/main.csv", "--cores", "2", "--resources", "gpu=2",
                     "--configfile", "config/test.yaml", overlay, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    table = pd.read_csv(workdir / "results/tables/main.csv")
    assert set(table["model"]) == set(NEW_FAMILIES)
    for _, rows in table.groupby("model"):
        assert len(rows) == 5
        pruned = rows["pruner"] != "none"
        assert (rows.loc[pruned, "measured_sparsity"] == 0.5).all()
        rot_only = (rows["pruner"] == "none") & (rows["rotation"] == "denoise")
        assert rows.loc[rot_only, "rotation_only_matches_dense"].tolist() == [True]
        assert rows.loc[rows["finetune"] == "lora", "zeroshot_avg"].notna().all()


def test_a_refused_family_fails_at_planning_naming_it_and_the_reason(tmp_path: Path) -> None:
    from transformers import Gemma2Config

    workdir = _copy_workflow(tmp_path)
    Gemma2Config(architectures=["Gemma2ForCausalLM"], vocab_size=384, hidden_size=64).save_pretrained(
        tmp_path / "gemma2"
    )
    overlay = _overlay(workdir, "gemma.yaml", {
        "models": [{"slug": "tiny-gemma2", "source": f"local:{tmp_path / 'gemma2'}", "params_b": 0.001}],
    })  # fmt: skip
    proc = snakemake(workdir, "-n", "results/tables/main.csv", "--configfile", "config/test.yaml", overlay)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Gemma2ForCausalLM is refused" in log and "no adapter and contract test" in log, log[-3000:]
    assert "rule calibrate" not in log


def test_merged_configs_leave_nothing_of_the_paper_grid() -> None:
    """Every mapping key of config.yaml is set by demo.yaml and test.yaml (lists replace wholesale)."""

    def leaves(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.items():
            if isinstance(value, dict):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    paper = leaves(yaml.safe_load((ROOT / "config/config.yaml").read_text()))
    for name in ("demo.yaml", "test.yaml"):
        missing = paper - leaves(yaml.safe_load((ROOT / "config" / name).read_text()))
        assert not missing, f"config/{name} inherits {sorted(missing)} from config/config.yaml"


def test_lint_is_clean(fresh: Path) -> None:
    proc = snakemake(fresh, "--lint")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in log, log[-4000:]
