"""The experiment grid without Snakemake: rows, their paths (round trip), ids that change
exactly with the settings that determine them, stage params, costs."""

from __future__ import annotations

import copy
import math

import jsonschema
import pytest
import yaml

from denoiserotator.method.sequential import PruneSettings
from denoiserotator.plan import costs
from denoiserotator.plan.experiment import Experiment, Row
from tests.conftest import ROOT, merged_config

SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


def load(name: str, **overlay) -> dict:
    """`merged_config(name, **overlay)` with the schema's defaults filled in, as Snakemake's
    validate does."""
    config = merged_config(name, **overlay)
    # fills in defaults, as snakemake.utils.validate does
    validator = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        {"properties": _set_defaults(jsonschema.Draft202012Validator.VALIDATORS["properties"])},
    )
    validator(SCHEMA).validate(config)
    return config


def _set_defaults(validate_properties):
    def properties(validator, props, instance, schema):
        for key, sub in props.items():
            if isinstance(instance, dict) and "default" in sub:
                instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, props, instance, schema)

    return properties


def test_every_row_path_round_trips() -> None:
    exp = Experiment(load("config.yaml"))
    rows = exp.rows()
    assert rows and len({row.path for row in rows}) == len(rows)
    for row in rows:
        assert Row.from_path(row.path) == row
        assert exp.row_for(row.path) == row


def test_paper_grid_has_every_cell_per_model() -> None:
    config = load("config.yaml")
    exp = Experiment(config)
    per_model = 1 + len(config["pruners"]) * len(config["patterns"]) * len(config["rotations"]) + 1
    assert len(exp.rows()) == per_model * len(config["models"])


def _paths(exp: Experiment) -> dict[tuple, str]:
    return {tuple(row.key().values()): row.path for row in exp.rows()}


@pytest.mark.parametrize("overlay", [{"steps": 7}, {"tangent_betas": [0.7, 0.99]}, {"tangent_lr": 0.03}])
def test_a_rotation_setting_changes_exactly_the_rotated_rows(overlay: dict) -> None:
    before = _paths(Experiment(load("demo.yaml")))
    after = _paths(Experiment(load("demo.yaml", rotation=overlay)))
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {key for key in before if key[3] == "denoise"}


def test_rotation_ids_differ_by_loss_score_and_damping() -> None:
    exp = Experiment(load("demo.yaml"))
    assert (
        exp.variant_name("wanda", "50%", "denoise")[-8:]
        != exp.variant_name("sparsegpt", "50%", "denoise")[-8:]
    )
    damped = Experiment(load("demo.yaml", pruning={"percdamp": 0.1}))
    assert damped.variant_name("wanda", "50%", "denoise") != exp.variant_name("wanda", "50%", "denoise")


def test_paths_of_other_settings_are_refused() -> None:
    exp = Experiment(load("demo.yaml"))
    other = Experiment(load("demo.yaml", rotation={"steps": 7}))
    rotated = next(row for row in other.rows() if row.rotation == "denoise")
    with pytest.raises(ValueError, match="other settings"):
        exp.row_for(rotated.path)
    with pytest.raises(ValueError, match="not a row path"):
        Row.from_path("model/c-123/wanda_50pct_none")


def test_prune_params_carry_whole_sections_and_build_the_job() -> None:
    exp = Experiment(load("demo.yaml"))
    plain = next(r for r in exp.rows() if r.pruner == "wanda" and r.rotation == "none")
    rotated = next(r for r in exp.rows() if r.pruner == "wanda" and r.rotation == "denoise")
    plain_params = exp.prune_params(plain.model, plain.calib, plain.variant)
    assert "rotation" not in plain_params  # so rotation changes never rerun plain rows
    job = PruneSettings.from_params(exp.prune_params(rotated.model, rotated.calib, rotated.variant))
    assert job.rotation == exp.rotation and job.pruning == exp.pruning
    assert PruneSettings.from_params(plain_params).rotation is None


def test_costs_scale_with_size_and_honour_overrides() -> None:
    config = load("config.yaml")
    exp = Experiment(config)
    small, big = "llama3-8b", "llama3-70b"
    assert costs.mem_mb(exp, big, "prune") > costs.mem_mb(exp, small, "prune")
    assert costs.runtime(exp, small, "prune", rotated=True) > costs.runtime(exp, small, "prune")
    assert costs.mem_mb(exp, small, "prune", attempt=2) == 2 * costs.mem_mb(exp, small, "prune")
    config["models"][0]["resources"] = {"prune": {"mem_mb": 1234}}
    assert costs.mem_mb(Experiment(config), small, "prune") == 1234


def test_zeroshot_rows_select_rows_without_changing_their_files() -> None:
    """Claim: eval.zeroshot.rows limits zero-shot to the matching rows (pruner/pattern: both
    rotations, every finetune, none/dense = dense and rotation-only; a rotation and finetune part
    narrow it), keeps the files of the rows it selects (not part of the id), and rejects
    selectors that name no row."""
    every = Experiment(load("demo.yaml", eval={"zeroshot": {"rows": None}}))  # every row
    some = Experiment(load("demo.yaml", eval={"zeroshot": {"rows": ["none/dense", "wanda/2:4"]}}))
    assert every.zeroshot_id() == some.zeroshot_id()
    chosen = [(r.pruner, r.pattern, r.rotation, r.finetune) for r in some.rows()
              if "zeroshot" in some.row_files(r)]  # fmt: skip
    assert sorted(chosen) == sorted([("none", "dense", "none", "none"), ("none", "dense", "denoise", "none"),
                                     ("wanda", "2:4", "none", "none"), ("wanda", "2:4", "denoise", "none"),
                                     ("wanda", "2:4", "denoise", "lora")])  # fmt: skip
    assert all("zeroshot" in every.row_files(r) for r in every.rows())
    for row in some.rows():
        if "zeroshot" in some.row_files(row):
            assert some.row_files(row)["zeroshot"] == every.row_files(row)["zeroshot"]
    assert len([f for f in some.table_inputs() if "/zeroshot-" in f]) == 5
    narrow = ["none/dense/none", "sparsegpt/50%/denoise/none"]
    only = Experiment(load("demo.yaml", eval={"zeroshot": {"rows": narrow}}))
    chosen = [(r.pruner, r.pattern, r.rotation, r.finetune) for r in only.rows()
              if "zeroshot" in only.row_files(r)]  # fmt: skip
    assert chosen == [("none", "dense", "none", "none"), ("sparsegpt", "50%", "denoise", "none")]
    bad_selectors = ("wanda", "none/50%", "wanda/dense", "owl/50%", "wanda/50%/yes", "wanda/50%/none/x",
                     "wanda/50%/none/none/best", "wanda/50%/none/none/none/none")  # fmt: skip
    for bad in ([selector] for selector in bad_selectors):
        with pytest.raises(Exception, match="pruner/pattern"):
            Experiment(load("demo.yaml", eval={"zeroshot": {"rows": bad}}))


def test_a_zeroshot_selector_can_name_the_refinement() -> None:
    """Claim: a fifth selector part picks refined or unrefined rows; without it both match."""
    grid = {"refine": ["none", "swaps"], "eval": {"zeroshot": {"rows": None}}}

    def chosen(*selectors: str) -> list[tuple[str, str, str]]:
        exp = Experiment(load("demo.yaml", **{**grid, "eval": {"zeroshot": {"rows": list(selectors)}}}))
        wanda_24 = [r for r in exp.rows() if r.pruner == "wanda" and r.pattern == "2:4"]
        return sorted((r.rotation, r.finetune, r.refine) for r in wanda_24 if "zeroshot" in exp.row_files(r))

    assert chosen("wanda/2:4/denoise/none/none") == [("denoise", "none", "none")]
    assert chosen("wanda/2:4/denoise/none/swaps") == [("denoise", "none", "swaps")]
    assert chosen("wanda/2:4/denoise/none") == [("denoise", "none", "none"), ("denoise", "none", "swaps")]
    assert ("none", "none", "swaps") in chosen("wanda/2:4")


def test_evaluation_params_carry_the_model_dtype() -> None:
    """Claim: a bf16 model entry's perplexity and zero-shot rules get compute.dtype bfloat16 (the
    scripts build ComputeSettings from it), a float32 entry float32."""
    from denoiserotator.settings import ComputeSettings

    exp = Experiment(load("config.yaml"))
    for model, dtype in (("llama3-70b", "bfloat16"), ("qwen2.5-72b", "bfloat16"), ("llama3-8b", "float32")):
        row = next(r for r in exp.rows() if r.model == model)
        for name in exp.perplexity:
            assert ComputeSettings.from_mapping(exp.ppl_params(name, row.path)["compute"]).dtype == dtype
        assert ComputeSettings.from_mapping(exp.zeroshot_params(row.path)["compute"]).dtype == dtype


def test_eval_gpu_requests_follow_weights_and_eval_mode() -> None:
    """Claim: zero-shot asks for as many A100-80G as the weights in the model's dtype need (each less
    the reserve): 70B/72B in bf16 and 32B in fp32 need 2, 8B one; layer-wise perplexity (auto on
    CUDA) stays on one GPU, whole-model perplexity is sized like zero-shot; overrides and CPU-only
    configs win; prune keeps compute.gpus."""
    exp = Experiment(load("config.yaml"))
    gib = costs.GPU_MEMORY_GIB - costs.EVAL_GPU_RESERVE_GIB
    for model in exp.models:
        weights = costs.weights_bytes(exp, model)
        expected = math.ceil(weights / (gib * 2**30))
        assert costs.gpus(exp, model, "zeroshot") == max(1, expected)
        assert costs.gpus(exp, model, "perplexity") == 1 == costs.gpus(exp, model, "prune")
    assert costs.gpus(exp, "llama3-70b", "zeroshot") == 2 and costs.gpus(exp, "llama3-8b", "zeroshot") == 1
    assert costs.weights_bytes(exp, "llama3-70b") == 70.6e9 * 2  # bf16 entry
    whole = Experiment(load("config.yaml", compute={"eval_mode": "whole"}))
    assert costs.gpus(whole, "qwen2.5-72b", "perplexity") == costs.gpus(whole, "qwen2.5-72b", "zeroshot") == 2
    config = load("config.yaml")
    config["models"][1]["resources"] = {"zeroshot": {"gpu": 4}}
    assert costs.gpus(Experiment(config), "llama3-70b", "zeroshot") == 4
    assert costs.gpus(Experiment(load("config.yaml", compute={"gpus": 0})), "llama3-70b", "zeroshot") == 0


def test_gpu_steps_are_the_rules_that_request_gpus() -> None:
    """Claim: the table's GPU column covers exactly the rules declaring gpu=get_resource(<step>, "gpu")."""
    import re

    text = "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    assert set(re.findall(r'gpu=get_resource\("(\w+)", "gpu"\)', text)) == set(costs.GPU_STEPS)


def test_readme_cluster_table_is_the_command_output() -> None:
    """Claim: the cluster guide's resource table (docs/cluster.md) is what
    `python -m denoiserotator.plan.costs table` prints for config/config.yaml (regenerate it with that
    command when the sizing changes)."""
    import contextlib
    import io
    import os

    buffer = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(buffer):
            costs.main(["table"])
    finally:
        os.chdir(cwd)
    printed = buffer.getvalue()
    assert printed == costs.resource_table(Experiment(load("config.yaml")))  # same defaults as Snakemake's
    readme = (ROOT / "docs" / "cluster.md").read_text()
    start = readme.index("<!-- costs table: begin -->\n") + len("<!-- costs table: begin -->\n")
    end = readme.index("<!-- costs table: end -->")
    assert readme[start:end] == printed


@pytest.fixture
def paper() -> Experiment:
    return Experiment(load("config.yaml"))


def test_runtime_requests_are_capped_at_the_partitions_limit(
    paper: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    variant = "sparsegpt_50pct_dr-00000000"
    monkeypatch.delenv(costs.MAX_RUNTIME_VARIABLE, raising=False)
    whole = costs.runtime(paper, "llama3-70b", "prune", True, variant=variant)
    small = costs.runtime(paper, "llama3-8b", "prune", True, variant=variant)
    assert small < 2160 < whole
    monkeypatch.setenv(costs.MAX_RUNTIME_VARIABLE, "2160")
    # resumable: at most the limit, on every attempt
    assert costs.runtime(paper, "llama3-70b", "prune", True, variant=variant) == 2160
    assert costs.runtime(paper, "llama3-70b", "prune", True, attempt=2, variant=variant) == 2160
    assert costs.runtime(paper, "llama3-8b", "prune", True, variant=variant) == small  # fits: unchanged
    assert costs.runtime(paper, "llama3-8b", "prune", True, attempt=2, variant=variant) == 2 * small


def test_a_job_that_cannot_resume_is_refused_above_the_limit(
    paper: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(costs.MAX_RUNTIME_VARIABLE, raising=False)
    finetune = costs.runtime(paper, "llama3-70b", "finetune")
    monkeypatch.setenv(costs.MAX_RUNTIME_VARIABLE, str(finetune - 1))
    with pytest.raises(costs.ResourceLimitError, match=r"finetune job of llama3-70b .* lower lora\.steps"):
        costs.runtime(paper, "llama3-70b", "finetune")
    # its first attempt fits: a retry asks for the limit instead of twice the estimate
    monkeypatch.setenv(costs.MAX_RUNTIME_VARIABLE, str(finetune + 1))
    assert costs.runtime(paper, "llama3-70b", "finetune", attempt=2) == finetune + 1


@pytest.mark.parametrize("value", ["abc", "0", "-5", "2-00:00:00", "48h"])
def test_a_malformed_limit_is_named(value: str, monkeypatch: pytest.MonkeyPatch, paper: Experiment) -> None:
    monkeypatch.setenv(costs.MAX_RUNTIME_VARIABLE, value)
    with pytest.raises(costs.ResourceLimitError, match=r"DENOISEROTATOR_MAX_RUNTIME=.*whole minutes"):
        costs.runtime(paper, "llama3-8b", "prune")


def test_prune_attempts_cover_the_work_lost_at_each_restart(
    paper: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays the attempts: each one loads the model again (the fixed minutes), runs until the
    limit and keeps only the layers up to its last checkpoint (written once 30 minutes or 8 layers
    have passed after a layer); the count `prune_attempts` gives is the count this replay needs."""
    monkeypatch.delenv(costs.MAX_RUNTIME_VARIABLE, raising=False)
    variant, model = "sparsegpt_50pct_dr-00000000", "llama3-70b"
    total = costs.runtime(paper, model, "prune", True, variant=variant)
    fixed = 20 + 6 * paper.models[model].params_b
    layers = 80
    per_layer = (total - fixed) / layers
    settings = paper.compute_for(model)

    def replay(limit: int) -> int:
        done, attempts = 0, 0
        while done < layers:
            attempts += 1
            clock, since_checkpoint, checkpointed = fixed, 0, done
            while done < layers and clock + per_layer <= limit:
                clock, done = clock + per_layer, done + 1
                since_checkpoint += 1
                if since_checkpoint >= settings.checkpoint_every_layers or (
                    since_checkpoint * per_layer >= settings.checkpoint_every_minutes
                ):
                    checkpointed, since_checkpoint = done, 0
            if done < layers:
                done = checkpointed  # killed at the limit: back to the last checkpoint
            assert attempts < 100
        return attempts

    for limit in (1440, 2880, 4000):
        # the model's count is the replay's or (conservatively) one more, never fewer
        assert costs.prune_attempts(paper, model, True, variant, limit) in (replay(limit), replay(limit) + 1)
    assert costs.prune_attempts(paper, model, True, variant, total) == 1
    with pytest.raises(costs.ResourceLimitError, match="less than one layer"):
        costs.prune_attempts(paper, model, True, variant, int(fixed) + 10)


def test_too_few_retries_for_the_attempts_are_refused(
    paper: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(costs.MAX_RUNTIME_VARIABLE, "1440")
    variant = "sparsegpt_50pct_dr-00000000"
    attempts = costs.prune_attempts(paper, "llama3-70b", True, variant)
    assert attempts > 2
    with pytest.raises(costs.ResourceLimitError, match=rf"--retries {attempts - 1}"):
        costs.check_prune_retries(paper, "llama3-70b", True, variant, retries=1)
    costs.check_prune_retries(paper, "llama3-70b", True, variant, retries=attempts - 1)
    costs.check_prune_retries(paper, "llama3-8b", True, variant, retries=0)


def test_memory_requests_stay_within_a_nodes_memory(
    paper: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry (after a time limit as often as after running out of memory) asks for at most
    DENOISEROTATOR_MAX_MEM_MB, not twice a request that already filled a node; a first request
    above it is refused, naming the job and what to change."""
    monkeypatch.delenv(costs.MAX_MEM_VARIABLE, raising=False)
    prune = costs.mem_mb(paper, "llama3-70b", "prune")
    finetune = costs.mem_mb(paper, "llama3-70b", "finetune")
    assert prune < 250_000 < finetune and costs.mem_mb(paper, "llama3-70b", "prune", attempt=2) == 2 * prune
    monkeypatch.setenv(costs.MAX_MEM_VARIABLE, "250000")
    assert costs.mem_mb(paper, "llama3-70b", "prune") == prune
    assert costs.mem_mb(paper, "llama3-70b", "prune", attempt=2) == 250_000
    with pytest.raises(
        costs.ResourceLimitError, match=r"finetune job of llama3-70b needs about \d+ MB .* 250000 MB"
    ):
        costs.mem_mb(paper, "llama3-70b", "finetune")
    monkeypatch.setenv(costs.MAX_MEM_VARIABLE, "250GB")
    with pytest.raises(costs.ResourceLimitError, match=r"DENOISEROTATOR_MAX_MEM_MB='250GB'.*whole MB"):
        costs.mem_mb(paper, "llama3-8b", "prune")


def _planned(exp: Experiment) -> dict[str, object]:
    """Every output path of the grid with the params its job gets (what Snakemake compares)."""
    planned: dict[str, object] = {path: None for path in exp.table_inputs()}
    for row in exp.rows():
        if row.prune_dir:
            model, calib, variant = row.prune_dir.split("/")[2:]
            planned[row.prune_dir] = exp.prune_params(model, calib, variant)
        for name, path in exp.row_files(row)["ppl"].items():
            planned[path] = exp.ppl_params(name, row.path)
        if "zeroshot" in exp.row_files(row):
            planned[exp.row_files(row)["zeroshot"]] = exp.zeroshot_params(row.path)
    return planned


def test_compute_fields_that_change_no_number_rerun_nothing() -> None:
    """Threads, GPU counts, evaluation batching and the checkpoint cadence are read by a job from
    the config when it runs, not carried in its params: editing them (more CPUs on another site)
    reruns no job of the grid; the dtype or the prune batch size still does."""
    before = _planned(Experiment(load("demo.yaml")))
    for edit in ({"threads": 3}, {"gpus": 2}, {"eval_batch_size": 4}, {"checkpoint_every_layers": 2},
                 {"checkpoint_every_minutes": 5}, {"eval_mode": "whole"}):  # fmt: skip
        assert _planned(Experiment(load("demo.yaml", compute=edit))) == before, edit
    for edit in ({"dtype": "bfloat16"}, {"prune_batch_size": 3}):
        assert _planned(Experiment(load("demo.yaml", compute=edit))) != before, edit


def test_an_unused_optimizers_knob_renames_and_reruns_nothing() -> None:
    """`rotation` holds three optimizers' knobs; a row's id and its job's params carry only the
    selected one's, so tuning the paper optimizer's Adam betas while `cayley` is selected plans
    nothing new, while `steps` or cayley's own step size replans exactly the rotated rows."""
    base = Experiment(load("demo.yaml"))
    assert base.rotation.optimizer == "cayley"
    before = _planned(base)
    for unused in ({"betas": [0.5, 0.9]}, {"lr": 0.5}, {"history": 3}, {"clip": 2.0}):
        assert _planned(Experiment(load("demo.yaml", rotation=unused))) == before, unused
    for used in ({"steps": 7}, {"tangent_lr": 0.05}, {"tol": 0.01}):
        after = _planned(Experiment(load("demo.yaml", rotation=used)))
        changed = {path for path in after if path not in before or after[path] != before[path]}
        assert changed and all("dr-" in path for path in changed), used
        kept = {path for path in before if "dr-" not in path}
        assert all(after.get(path) == before[path] for path in kept), used
    # with `paper` selected the roles swap
    paper = Experiment(load("demo.yaml", rotation={"optimizer": "paper"}))
    assert _planned(
        Experiment(load("demo.yaml", rotation={"optimizer": "paper", "tangent_lr": 0.5}))
    ) == _planned(paper)
    assert _planned(Experiment(load("demo.yaml", rotation={"optimizer": "paper", "lr": 0.5}))) != _planned(
        paper
    )


STAGE_SECTIONS = [("rotation",), ("pruning",), ("calibration",), ("finetune", "train"), ("finetune", "lora"),
                  ("eval", "zeroshot"), ("compute",)]  # fmt: skip


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml", "test.yaml"])
def test_shipped_configs_state_only_what_differs_from_their_defaults(name: str) -> None:
    """Defaults live in one place (the settings classes, through the schema): config.yaml states
    no stage value at its default, and the demo/test overlays none at config.yaml's value, so a
    changed default cannot be shadowed by a stale copy. The overlays do restate every key that
    config.yaml itself sets (nothing of the paper grid leaks into them: tests/workflow/test_workflow.py)."""
    raw = yaml.safe_load((ROOT / "config" / name).read_text())
    paper = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    base = None if name == "config.yaml" else load("config.yaml")
    restated = []
    for path in STAGE_SECTIONS:
        schema, values, reference, set_by_paper = SCHEMA, raw, base, paper
        for key in path:
            schema = schema["properties"][key]
            values = (values or {}).get(key) or {}
            reference = None if reference is None else reference.get(key, {})
            set_by_paper = (set_by_paper or {}).get(key) or {}
        for key, value in values.items():
            if reference is not None and key in set_by_paper:
                continue  # the overlay must state it
            expected = schema["properties"][key].get("default") if reference is None else reference.get(key)
            if value == expected or (isinstance(expected, list | tuple) and value == list(expected)):
                restated.append(".".join((*path, key)))
    assert not restated, f"{name} restates {restated}"


def test_the_refine_axis_adds_rows_and_renames_none() -> None:
    """Refined rows get their own ids (the method, the swap knobs for swaps, the damping); the
    unrefined rows' paths are those of a config without the axis; paths round-trip."""
    base = {"models": [{"slug": "m", "source": "tiny:llama"}], "pruners": ["wanda"], "patterns": ["2:4"]}
    plain = Experiment(base)
    refined = Experiment({**base, "refine": ["none", "lsq", "swaps"]})
    old = {row.path for row in plain.rows()}
    new = {row.path for row in refined.rows()}
    assert old < new and len(new - old) == 4  # 2 rotations x {lsq, swaps}
    for row in refined.rows():
        assert refined.row_for(row.path) == row
        assert (row.refine != "none") == any(f"_{m}-" in row.path for m in ("lsq", "swaps"))
    swaps = {r.path for r in refined.rows() if r.refine == "swaps"}
    lsq = {r.path for r in refined.rows() if r.refine == "lsq"}
    knob = Experiment({**base, "refine": ["none", "lsq", "swaps"], "refinement": {"max_swaps": 7}})
    assert {r.path for r in knob.rows() if r.refine == "lsq"} == lsq  # lsq reads no swap knob
    assert {r.path for r in knob.rows() if r.refine == "swaps"}.isdisjoint(swaps)
    damped = Experiment({**base, "refine": ["none", "lsq"], "pruning": {"percdamp": 0.1}})
    assert {r.path for r in damped.rows() if r.refine == "lsq"}.isdisjoint(lsq)
    row = next(r for r in refined.rows() if r.refine == "swaps" and r.rotation == "none")
    params = refined.prune_params(row.model, row.calib, row.variant)
    assert params["refine"] == {"method": "swaps", "max_swaps": 100, "candidates": 16}
    unrefined = next(r for r in refined.rows() if r.refine == "none" and r.pruner == "wanda")
    assert "refine" not in refined.prune_params(unrefined.model, unrefined.calib, unrefined.variant)


def test_the_cost_model_counts_the_refinement() -> None:
    """A refined prune job's counted work is the unrefined one's plus the refinement's
    (`flops.refine_linear` per linear, whose counted products FlopCounterMode checks in
    tests/plan/test_flops.py)."""
    from denoiserotator.plan import flops
    from denoiserotator.plan.costs import prune_work

    shape = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2}
    config = {"models": [{"slug": "m", "source": "tiny:llama", "shape": shape}], "refine": ["none", "swaps"]}
    exp = Experiment(config)
    rows = {r.refine: r for r in exp.rows()
            if r.pruner == "wanda" and r.pattern == "2:4" and r.rotation == "none"}  # fmt: skip
    base = prune_work(exp, "m", False, rows["none"].variant)
    refined = prune_work(exp, "m", False, rows["swaps"].variant)
    layer = flops.LayerShape.from_entry(exp.models["m"])
    assert layer is not None
    expected = sum(
        (flops.refine_linear("swaps", out, inp, 0.5, 100, 16, 4) for out, inp in layer.linears().values()),
        flops.Work(),
    ) * layer.layers
    # the Wanda Grams become full ones: 2 · tokens · width² instead of 2 · tokens · width
    assert refined.total > base.total + expected.total
    assert refined.matmul > base.matmul + expected.matmul
