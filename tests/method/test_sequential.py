"""The sequential engine and the DenoiseRotator pipeline on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from denoiserotator.method import checkpoint
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.method.engine import capture_layer_inputs, run_layer
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.method.statistics import input_statistics
from denoiserotator.settings import ComputeSettings, PruningSettings, RotationSettings, SettingsError
from denoiserotator.testing import FAMILIES, tiny_model
from tests.method.test_rotation_fuse import apply_boundary_hooks

# A checkpoint after every layer (the default is every 8 layers or 30 minutes).
EVERY_LAYER = ComputeSettings(checkpoint_every_layers=1, checkpoint_every_minutes=0)


def calibration(model: torch.nn.Module, samples: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (samples, length), generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_reproduces_the_models_hidden_states(family: str) -> None:
    model = tiny_model(family, num_layers=3)
    ids = calibration(model, length=20)  # longer than Mistral's window of 8
    adapter = get_adapter(model)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    inputs = capture_layer_inputs(adapter, ids, batch_size=2, device=torch.device("cpu"), dtype=torch.float32)
    assert "position_embeddings" in inputs.layer_kwargs[0]
    hidden = inputs.hidden
    assert torch.allclose(torch.cat(hidden), reference[0], atol=1e-6)
    for index in range(adapter.num_layers):
        hidden = run_layer(adapter.layers[index], hidden, inputs.layer_kwargs[index])
        if index < adapter.num_layers - 1:  # the last entry of hidden_states is after the final norm
            assert torch.allclose(torch.cat(hidden), reference[index + 1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("merge", [True, False])
def test_rotation_only_pipeline_keeps_the_function(family: str, merge: bool) -> None:
    model = tiny_model(family, num_layers=2, tie=family == "llama")
    ids = calibration(model)
    with torch.no_grad():
        expected = model(ids).logits
    settings = PruneSettings(
        pruner="none", pattern=None, rotation=RotationSettings(steps=15, loss_score="wanda")
    )
    result = run_pipeline(model, ids, settings, progress=False, merge_boundaries=merge)
    # The rotations really moved away from identity and lowered the loss.
    assert all(stat["entropy_after"] < stat["entropy_before"] for stat in result.layer_stats)
    assert all(not torch.allclose(q, torch.eye(q.shape[0])) for q in result.rotations)
    if merge:
        apply_boundary_hooks(result.model, result.boundary)
    with torch.no_grad():
        actual = result.model(ids).logits
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "pruner,pattern,rotation",
    [
        ("magnitude", "50%", "denoise"),
        ("wanda", "50%", "denoise"),
        ("sparsegpt", "50%", "none"),
        ("sparsegpt", "2:4", "denoise"),
        ("wanda", "4:8", "none"),
    ],
)
def test_pipeline_prunes_every_linear_to_the_exact_pattern(pruner: str, pattern: str, rotation: str) -> None:
    model = tiny_model("qwen2", num_layers=2)
    ids = calibration(model)
    settings = PruneSettings(
        pruner=pruner,
        pattern=pattern,
        rotation=RotationSettings(steps=5) if rotation == "denoise" else None,
        pruning=PruningSettings(sparsegpt_blocksize=32),
    )
    result = run_pipeline(model, ids, settings, progress=False)
    adapter = get_adapter(result.model)
    for index in range(adapter.num_layers):
        for name in LINEAR_NAMES:
            weight = adapter.layer(index).linear(name).weight.data
            zeros = weight == 0
            if ":" in pattern:
                n, m = (int(part) for part in pattern.split(":"))
                groups = zeros.reshape(weight.shape[0], -1, m).sum(dim=-1)
                assert bool((groups >= n).all()), (index, name)
            else:
                assert zeros.float().mean().item() == pytest.approx(0.5, abs=1e-6), (index, name)
            if pruner == "wanda" and ":" not in pattern:
                assert bool((zeros.sum(dim=1) == weight.shape[1] // 2).all())
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_pipeline_is_deterministic() -> None:
    outputs = []
    for _ in range(2):
        model = tiny_model("llama", num_layers=2)
        settings = PruneSettings(pruner="wanda", pattern="2:4", rotation=RotationSettings(steps=5))
        result = run_pipeline(model, calibration(model), settings, progress=False)
        outputs.append(torch.cat([p.detach().flatten() for p in result.model.parameters()]))
    assert torch.equal(outputs[0], outputs[1])


def test_bad_settings_fail_clearly() -> None:
    with pytest.raises(SettingsError, match="unknown pruner"):
        PruneSettings(pruner="obs")
    with pytest.raises(SettingsError, match="dense"):
        PruneSettings(pruner="none", rotation=None)
    with pytest.raises(SettingsError, match=r"rotation\.lr: Input should be greater than 0"):
        RotationSettings.from_mapping({"lr": 0})
    with pytest.raises(SettingsError, match=r"rotation\.betas\[1\]"):
        RotationSettings.from_mapping({"betas": (0.9, 1.0)})


def _assert_same_run(reference, resumed) -> None:
    """A resumed run equals the uninterrupted one: the same computation, so bit for bit."""
    for expected, actual in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(expected, actual)
    assert [s["entropy_after"] for s in resumed.layer_stats] == [
        s["entropy_after"] for s in reference.layer_stats
    ]


# Families whose processed layers differ in structure from the loaded ones: Phi-3 (split fused
# linears, saved fused), Gemma 3 (post-norms turned into d×d matrices).
@pytest.mark.parametrize("family", ["mistral", "phi3", "gemma3_text"])
def test_a_killed_run_resumes_from_its_layer_checkpoint(family: str, tmp_path, monkeypatch) -> None:
    settings = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=4), compute=EVERY_LAYER
    )
    reference_model = tiny_model(family, num_layers=3)
    ids = calibration(reference_model)
    reference = run_pipeline(reference_model, ids, settings, progress=False)

    import denoiserotator.method.sequential as pipeline

    real_run_layer = pipeline.run_layer
    calls = {"n": 0}

    def dying_run_layer(*args, **kwargs):
        calls["n"] += 1
        # one call per layer (propagating its outputs; Gram passes stop early, without it): die
        # in layer 2, after it was rotated and pruned
        if calls["n"] == 3:
            raise RuntimeError("node failure")
        return real_run_layer(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_layer", dying_run_layer)
    with pytest.raises(RuntimeError, match="node failure"):
        run_pipeline(
            tiny_model(family, num_layers=3), ids, settings, progress=False, checkpoint_dir=tmp_path
        )
    monkeypatch.setattr(pipeline, "run_layer", real_run_layer)
    assert (tmp_path / "layer-0001.pt").exists() and not (tmp_path / "layer-0002.pt").exists()

    resumed = run_pipeline(
        tiny_model(family, num_layers=3), ids, settings, progress=False, checkpoint_dir=tmp_path
    )
    _assert_same_run(reference, resumed)
    # Other settings never pick up this checkpoint.
    other = PruneSettings(
        pruner="wanda", pattern="2:4", rotation=RotationSettings(steps=4), compute=EVERY_LAYER
    )
    fresh = run_pipeline(
        tiny_model(family, num_layers=3), ids, other, progress=False, checkpoint_dir=tmp_path
    )
    assert len(fresh.layer_stats) == 3


def test_resume_is_exact_when_checkpoints_are_every_k_layers(tmp_path, monkeypatch) -> None:
    """With checkpoint_every_layers=2 the activations are written once in 4 layers (not after
    every layer), and a run killed in layer 3 resumes after layer 1 (layer 2, finished but not
    checkpointed, is redone) with a result equal to an uninterrupted run."""
    import denoiserotator.method.sequential as pipeline

    compute = ComputeSettings(checkpoint_every_layers=2, checkpoint_every_minutes=0)
    settings = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=4), compute=compute
    )
    ids = calibration(tiny_model("llama", num_layers=4))
    reference = run_pipeline(tiny_model("llama", num_layers=4), ids, settings, progress=False)

    real_run_layer, real_save = pipeline.run_layer, checkpoint._atomic_save
    calls = {"n": 0}
    hidden_writes: list[str] = []

    def dying_run_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # one call per layer (propagation): die inside layer 3
            raise RuntimeError("node failure")
        return real_run_layer(*args, **kwargs)

    def counting_save(obj, path):
        if path.name.startswith("hidden"):
            hidden_writes.append(path.name)
        return real_save(obj, path)

    monkeypatch.setattr(pipeline, "run_layer", dying_run_layer)
    monkeypatch.setattr(checkpoint, "_atomic_save", counting_save)
    with pytest.raises(RuntimeError, match="node failure"):
        run_pipeline(
            tiny_model("llama", num_layers=4), ids, settings, progress=False, checkpoint_dir=tmp_path
        )
    monkeypatch.setattr(pipeline, "run_layer", real_run_layer)
    assert len(hidden_writes) == 1  # after layer 1 only; layer 2 finished but was not due
    assert sorted(p.name for p in tmp_path.glob("layer-*.pt")) == ["layer-0000.pt", "layer-0001.pt"]

    # Resuming with another frequency keeps the checkpoint: frequency is not part of its key.
    every_layer = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=4), compute=EVERY_LAYER
    )
    resumed = run_pipeline(
        tiny_model("llama", num_layers=4), ids, every_layer, progress=False, checkpoint_dir=tmp_path
    )
    _assert_same_run(reference, resumed)
    # Layers 2 (resumed run, every layer) written; layer 3 is the last: the job is done, no write.
    assert len(hidden_writes) == 2


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one(tmp_path, monkeypatch) -> None:
    """Killed after the new activations are on disk but before progress.json names them: the
    resumed run takes the previous checkpoint whole (its layers and its own activations) and
    equals an uninterrupted run. Overwriting one activations file in place would pair layer 1's
    progress with layer 2's inputs here."""
    import os

    settings = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=4), compute=EVERY_LAYER
    )
    ids = calibration(tiny_model("qwen2", num_layers=3))
    reference = run_pipeline(tiny_model("qwen2", num_layers=3), ids, settings, progress=False)
    real_replace = os.replace
    switches = {"n": 0}

    def dying_replace(src, dst, *args, **kwargs):
        if str(dst).endswith("progress.json"):
            switches["n"] += 1
            if switches["n"] == 2:  # the checkpoint after layer 1, all but its switch written
                raise KeyboardInterrupt("time limit")
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", dying_replace)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(
                tiny_model("qwen2", num_layers=3), ids, settings, progress=False, checkpoint_dir=tmp_path
            )
    resumed = run_pipeline(
        tiny_model("qwen2", num_layers=3), ids, settings, progress=False, checkpoint_dir=tmp_path
    )
    _assert_same_run(reference, resumed)


def test_checkpoint_policy_counts_layers_and_minutes() -> None:
    """A checkpoint is due once k layers or t minutes passed since the last one; 0 disables each."""
    from denoiserotator.method.checkpoint import CheckpointPolicy

    now = {"t": 0.0}
    policy = CheckpointPolicy(every_layers=3, every_minutes=10, clock=lambda: now["t"])
    assert [policy.due(done) for done in (1, 2, 3)] == [False, False, True]
    policy.saved(3)
    now["t"] = 599.0
    assert not policy.due(4)
    now["t"] = 600.0
    assert policy.due(4)  # ten minutes since the start, only one layer since the last checkpoint
    policy.saved(4)
    never = CheckpointPolicy(every_layers=0, every_minutes=0, clock=lambda: now["t"])
    now["t"] = 1e9
    assert not never.due(10**6)
    resumed = CheckpointPolicy(every_layers=2, every_minutes=0)
    resumed.start(5)
    assert not resumed.due(6) and resumed.due(7)


def test_a_checkpoint_of_another_model_is_never_resumed(tmp_path, monkeypatch, caplog) -> None:
    """Same slug, same shapes, same tokenizer and calibration, different weights (a corrected
    source, an updated local folder): the rerun must start over, not splice the old model's
    finished layers onto the new one's embeddings and head."""
    import logging

    settings = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=4), compute=EVERY_LAYER
    )
    ids = _interrupted_run(tmp_path, monkeypatch, settings)  # a run of the seed-0 model

    expected = run_pipeline(tiny_model("llama", seed=1, num_layers=3), ids, settings, progress=False)
    with caplog.at_level(logging.INFO):
        actual = run_pipeline(
            tiny_model("llama", seed=1, num_layers=3), ids, settings, progress=False, checkpoint_dir=tmp_path
        )
    for (name, want), got in zip(
        expected.model.state_dict().items(), actual.model.state_dict().values(), strict=True
    ):
        assert torch.equal(want, got), name
    assert [s["entropy_after"] for s in actual.layer_stats] == [
        s["entropy_after"] for s in expected.layer_stats
    ]
    assert "discarding the layer checkpoint" in caplog.text
    assert "resuming" not in caplog.text


def _interrupted_run(tmp_path, monkeypatch, settings: PruneSettings, family: str = "llama"):
    """Run 3 layers, die inside layer 2 (layers 0 and 1 checkpointed); the calibration ids."""
    import denoiserotator.method.sequential as pipeline

    ids = calibration(tiny_model(family, num_layers=3))
    real_run_layer = pipeline.run_layer
    calls = {"n": 0}

    def dying_run_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # one call per layer: dies inside layer 2
            raise RuntimeError("node failure")
        return real_run_layer(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "run_layer", dying_run_layer)
        with pytest.raises(RuntimeError, match="node failure"):
            run_pipeline(
                tiny_model(family, num_layers=3), ids, settings, progress=False, checkpoint_dir=tmp_path
            )
    assert (tmp_path / "layer-0001.pt").exists()
    return ids


def test_a_checkpoint_written_before_a_change_to_the_numerics_is_not_resumed(
    tmp_path, monkeypatch, caplog
) -> None:
    """The key hashes the numerics sources, not a version string that no layer-changing commit
    bumped: after an edit to one (here method/rotation/cayley.py, in a copy of the package), the job starts
    over; an edit to a planning module (tables.py) keeps the checkpoint."""
    import logging
    import shutil

    from denoiserotator.method import fingerprint

    package = tmp_path / "package"
    shutil.copytree(fingerprint.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", package)
    settings = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=3), compute=EVERY_LAYER
    )
    checkpoints = tmp_path / "checkpoints"
    ids = _interrupted_run(checkpoints, monkeypatch, settings)

    before = fingerprint.code_digest()
    with open(package / "tables.py", "a") as handle:
        handle.write("\n# a change to the report only\n")
    assert fingerprint.code_digest() == before
    with open(package / "method" / "rotation" / "cayley.py", "a") as handle:
        handle.write("\n# a change to the numerics\n")
    assert fingerprint.code_digest() != before
    with caplog.at_level(logging.INFO):
        fresh = run_pipeline(
            tiny_model("llama", num_layers=3), ids, settings, progress=False, checkpoint_dir=checkpoints
        )
    assert "discarding the layer checkpoint" in caplog.text and "resuming" not in caplog.text
    assert len(fresh.layer_stats) == 3


def test_changing_threads_or_evaluation_settings_keeps_a_checkpoint_resumable(
    tmp_path, monkeypatch, caplog
) -> None:
    """Threads, GPU counts and the evaluation settings cannot change a layer: a job resubmitted with
    other values resumes (and equals an uninterrupted run); the compute dtype still starts over.
    run_pipeline does not act on `compute.threads` (the stage scripts set torch's threads), so the
    resumed and the uninterrupted run are the same computation and compare bit for bit."""
    import logging
    from dataclasses import replace

    settings = PruneSettings(
        pruner="wanda", pattern="50%", rotation=RotationSettings(steps=3), compute=EVERY_LAYER
    )
    ids = _interrupted_run(tmp_path, monkeypatch, settings)
    reference = run_pipeline(tiny_model("llama", num_layers=3), ids, settings, progress=False)
    edited = replace(
        settings,
        compute=EVERY_LAYER.replace(threads=3, gpus=4, eval_batch_size=7, eval_mode="layerwise"),
    )
    assert edited.checkpoint_identity() == settings.checkpoint_identity()
    with caplog.at_level(logging.INFO):
        resumed = run_pipeline(
            tiny_model("llama", num_layers=3), ids, edited, progress=False, checkpoint_dir=tmp_path
        )
    assert "discarding" not in caplog.text
    _assert_same_run(reference, resumed)
    other_dtype = replace(settings, compute=EVERY_LAYER.replace(dtype="bfloat16"))
    assert other_dtype.checkpoint_identity() != settings.checkpoint_identity()


def test_an_interrupted_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    """A save interrupted half-way (here after a partial write) removes its temporary file: at
    70B it holds 4.3 GB of activations."""
    import denoiserotator.method.sequential as pipeline

    def interrupted_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(pipeline.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._atomic_save({"x": 1}, tmp_path / "hidden-3.pt")
    assert list(tmp_path.iterdir()) == []


def test_each_layer_logs_one_readable_line_with_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    """A long job's log says where it is: layer i/L, loss start → best with the relative drop,
    steps, sparsity, seconds, and the estimated time left (none after the last layer)."""
    import logging
    import re

    model = tiny_model("llama", num_layers=3)
    settings = PruneSettings(pruner="wanda", pattern="2:4", rotation=RotationSettings(steps=3))
    with caplog.at_level(logging.INFO, logger="denoiserotator.method.sequential"):
        result = run_pipeline(model, calibration(model), settings, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("layer ")]
    assert len(lines) == 3
    pattern = (
        r"layer (\d)/3: loss ([0-9.e+]+) → ([0-9.e+]+) \(([+-][0-9.]+)%\), 3 steps \(best at \d\), "
        r"stopped: step budget, "
        r"sparsity 0\.500, [0-9.]+ s; (~[0-9.]+ (s|min|h) left|done in [0-9.]+ (s|min|h))"
    )
    for index, (line, stats) in enumerate(zip(lines, result.layer_stats, strict=True)):
        match = re.fullmatch(pattern, line)
        assert match, line
        assert int(match.group(1)) == index + 1
        assert float(match.group(2)) == pytest.approx(stats["entropy_before"], rel=1e-3)
        assert float(match.group(3)) == pytest.approx(stats["entropy_after"], rel=1e-3)
        drop = 100 * (stats["entropy_after"] - stats["entropy_before"]) / stats["entropy_before"]
        assert float(match.group(4)) == pytest.approx(drop, abs=0.06)
    assert "left" in lines[0] and "done in" in lines[-1]


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_the_rotation_loss_builds_no_down_proj_statistic(variant: str, monkeypatch) -> None:
    """down_proj's factor cancels in its column groups: the paper variant never collects its
    Gram (nor inverts it); the reference variant does, as the reference code applies it in bf16."""
    from denoiserotator.method import sequential as pipeline

    collected: list[tuple[str, ...]] = []
    original = pipeline.checked_statistics

    def spy(view, index, names, hidden, kwargs, purpose, **extra):
        if purpose == "the rotation loss":
            collected.append(tuple(names))
        return original(view, index, names, hidden, kwargs, purpose, **extra)

    monkeypatch.setattr(pipeline, "checked_statistics", spy)
    model = tiny_model("llama", num_layers=2)
    rotation = RotationSettings(steps=2, loss_variant=variant)
    run_pipeline(model, calibration(model), PruneSettings("sparsegpt", "50%", rotation), progress=False)
    assert len(collected) == 2
    assert all(("down" in names) == (variant == "reference") for names in collected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gram_collection_stops_the_forward_once_its_inputs_are_seen(family: str) -> None:
    """input_statistics gives the Grams of a whole forward, but runs no linear after the last one
    it (or a caller's hook, via `until`) needs."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(adapter, ids, 2, torch.device("cpu"), torch.float32)
    view = adapter.layer(0)
    linears = view.linears()
    ran: list[str] = []
    full: dict[str, torch.Tensor] = {name: torch.zeros(()) for name in LINEAR_NAMES}

    def record(name: str):
        def hook(_module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            full[name] = full[name] + x.T @ x
            ran.append(name)

        return hook

    handles = [linears[name].register_forward_pre_hook(record(name)) for name in LINEAR_NAMES]
    run_layer(view.layer, inputs.hidden, inputs.layer_kwargs[0])
    whole_forward = dict(full)
    ran.clear()
    for names, until, last in ((("q",), (), "q"), (("o",), (), "o"), (("q", "gate"), ("down",), "down")):
        grams = input_statistics(view.layer, linears, names, inputs.hidden, inputs.layer_kwargs[0], until)
        for name in names:
            torch.testing.assert_close(grams[name], whole_forward[name], rtol=1e-10, atol=1e-10)
        # each batch reaches the last needed linear's entry (the caller's hook still sees it)...
        assert ran.count(last) == len(inputs.hidden)
        # ...and nothing after it runs
        order = list(LINEAR_NAMES)
        assert not set(ran) & set(order[order.index(last) + 1 :]), (names, ran)
        ran.clear()
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("rotated", [False, True])
def test_wanda_pruning_collects_only_gram_diagonals(monkeypatch: pytest.MonkeyPatch, rotated: bool) -> None:
    """Wanda reads only diag(H): its pruning passes accumulate Σ x² (in,), never an (in, in) Gram,
    and prune exactly as from the whole Gram's diagonal. Full Grams remain for the rotation loss."""
    import denoiserotator.method.gram as gram_module

    rotation = RotationSettings(steps=3, loss_score="wanda") if rotated else None
    settings = PruneSettings("wanda", "2:4", rotation)

    def pruned_weights(force_full: bool) -> tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]:
        shapes: list[tuple[int, ...]] = []
        real = gram_module.collect_grams

        def recording(linears, diagonal=False):
            shapes.append((len(linears), int(diagonal and not force_full)))
            return real(linears, diagonal and not force_full)

        with monkeypatch.context() as patch:
            # force_full: whole Grams reach Wanda, which reads their diagonal
            patch.setattr("denoiserotator.method.statistics.collect_grams", recording)
            model = tiny_model("qwen2", num_layers=2)
            run_pipeline(model, calibration(model), settings, progress=False)
        return {name: p.detach().clone() for name, p in model.named_parameters()}, shapes

    diagonal_only, calls = pruned_weights(force_full=False)
    whole_gram, _ = pruned_weights(force_full=True)
    pruning_calls = calls[1:5] if rotated else calls[:4]  # per layer: [rotation,] q/o/gate/down groups
    assert all(diagonal for _, diagonal in pruning_calls), calls
    if rotated:
        assert calls[0] == (3, 0), calls  # the rotation loss still takes whole Grams of q, o, gate
    assert len(calls) == 2 * (5 if rotated else 4)
    # Exact: both paths sum the same squares in float64 (by addmm or elementwise, which may
    # differ in the last float64 bit) and Wanda rounds the norms to float32, which absorbs that
    # unless a norm lies within ~1e-16 of a float32 rounding boundary (~1e-9 per column): the
    # scores, masks and weights are the same bits on any thread count.
    for name, weight in diagonal_only.items():
        assert torch.equal(weight, whole_gram[name]), name


def test_diagonal_statistics_equal_the_whole_grams_diagonal() -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(adapter, ids, 2, torch.device("cpu"), torch.float32)
    view = adapter.layer(0)
    names = ("q", "o", "down")
    whole = input_statistics(view.layer, view.linears(), names, inputs.hidden, inputs.layer_kwargs[0])
    diagonal = input_statistics(
        view.layer, view.linears(), names, inputs.hidden, inputs.layer_kwargs[0], diagonal=True
    )
    for name in names:
        assert diagonal[name].shape == (whole[name].shape[0],)
        torch.testing.assert_close(diagonal[name], torch.diagonal(whole[name]), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("signal_in", "done"), [("rotation of layer 2", 2), ("propagation of layer 0", 1)])
def test_sigterm_checkpoints_the_finished_layers_and_the_retry_resumes_exactly(
    tmp_path, monkeypatch, signal_in: str, done: int
) -> None:
    """SLURM's SIGTERM before the time limit (sbatch --signal): the job writes a checkpoint of every
    finished layer, even when none was due (here checkpoints are never due by count or time), and
    stops with Preempted; the attempt loses at most the layer in progress, and the resumed run is
    bit-identical to an uninterrupted one."""
    import json
    import os
    import signal

    import denoiserotator.method.sequential as pipeline
    from denoiserotator.preemption import Preempted, handle_signals

    never = ComputeSettings(checkpoint_every_layers=0, checkpoint_every_minutes=0)
    settings = PruneSettings(pruner="wanda", pattern="50%", rotation=RotationSettings(steps=4), compute=never)
    ids = calibration(tiny_model("llama", num_layers=4))
    reference = run_pipeline(tiny_model("llama", num_layers=4), ids, settings, progress=False)

    real_learn, real_run_layer = pipeline.learn_rotations, pipeline.run_layer
    calls = {"run_layer": 0}

    def learn(view, index, *args, **kwargs):
        if signal_in == "rotation of layer 2" and index == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, as slurmstepd sends it
        return real_learn(view, index, *args, **kwargs)

    def run_layer(*args, **kwargs):
        calls["run_layer"] += 1
        if signal_in == "propagation of layer 0" and calls["run_layer"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run_layer(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "learn_rotations", learn)
        patch.setattr(pipeline, "run_layer", run_layer)
        with handle_signals(), pytest.raises(Preempted, match="SIGTERM"):
            run_pipeline(
                tiny_model("llama", num_layers=4), ids, settings, progress=False, checkpoint_dir=tmp_path
            )
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == done
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the block
    relearned: list[int] = []

    def counting_learn(view, index, *args, **kwargs):
        relearned.append(index)
        return real_learn(view, index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "learn_rotations", counting_learn)
    resumed = run_pipeline(
        tiny_model("llama", num_layers=4), ids, settings, progress=False, checkpoint_dir=tmp_path
    )
    assert relearned == list(range(done, 4))  # resumed after the checkpointed layers, not from scratch
    _assert_same_run(reference, resumed)


@pytest.mark.parametrize(
    ("pruner", "pattern"), [("magnitude", "50%"), ("wanda", "2:4"), ("sparsegpt", "4:8")]
)
def test_refinement_inside_the_layer_loop_lowers_each_linears_error_at_the_exact_pattern(
    pruner: str, pattern: str
) -> None:
    """`refine: swaps` in the true-sequential loop: every linear's recorded error falls, the
    first group's (whose Gram both runs share) starts from the unrefined run's error, and the
    pattern is the pruner's, exactly (the same zeros per row or per group of M)."""
    ids = calibration(tiny_model("llama", num_layers=2))
    results = {}
    for refine in ("none", "swaps"):
        settings = PruneSettings(pruner=pruner, pattern=pattern, rotation=None, refine=refine,
                                 pruning=PruningSettings(sparsegpt_blocksize=32))  # fmt: skip
        results[refine] = run_pipeline(tiny_model("llama", num_layers=2), ids, settings, progress=False)
    refined = results["swaps"]
    for record in refined.layer_stats:
        assert set(record["refine_error"]) == set(LINEAR_NAMES)
        for name, (before, after) in record["refine_error"].items():
            assert after <= before and after < 0.999 * before, (record["layer"], name)
    plain_model, refined_model = (get_adapter(results[r].model) for r in ("none", "swaps"))
    for index in range(plain_model.num_layers):
        for name in LINEAR_NAMES:
            a = plain_model.layer(index).linear(name).weight.data
            b = refined_model.layer(index).linear(name).weight.data
            if ":" in pattern:
                m = int(pattern.split(":")[1])
                per_group = [(w == 0).reshape(w.shape[0], -1, m).sum(-1) for w in (a, b)]
                assert torch.equal(*per_group)
            else:
                assert int((a == 0).sum()) == int((b == 0).sum())
    # the first group's Gram is the same in both runs: the refinement starts where the pruner ended
    view = plain_model.layer(0)
    model = tiny_model("llama", num_layers=2)
    inputs = capture_layer_inputs(get_adapter(model), ids, 2, torch.device("cpu"), torch.float32)
    dense = get_adapter(model).layer(0)
    gram = input_statistics(dense.layer, dense.linears(), ("q",), inputs.hidden, inputs.layer_kwargs[0])["q"]
    w, p = dense.linear("q").weight.data.double(), view.linear("q").weight.data.double()
    error = float(((w - p) @ gram.double() * (w - p)).sum() / ((w @ gram.double()) * w).sum()) ** 0.5
    assert refined.layer_stats[0]["refine_error"]["q"][0] == pytest.approx(error, rel=1e-5)


def test_refinement_needs_a_pruner() -> None:
    with pytest.raises(SettingsError, match="refinement needs a pruner"):
        PruneSettings(pruner="none", pattern=None, rotation=RotationSettings(steps=1), refine="swaps")
    with pytest.raises(SettingsError, match="unknown refinement"):
        PruneSettings(pruner="wanda", refine="obs")
