"""The prune stage end to end on a saved tiny model: files written, loadable, exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denoiserotator import calibrate, prune
from denoiserotator.files.export import load_model
from denoiserotator.testing import save_tiny_model

TEXT = " ".join(
    f"Paragraph {i}: the nation and its congress met to weigh the duties, debts and the common defence."
    for i in range(60)
)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stage")
    model_dir = save_tiny_model("qwen2", root / "model", num_layers=2)
    (root / "train.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    calib = root / "calib.pt"
    calibrate.main(
        ["--model", str(model_dir), "--source", f"json:{root / 'train.jsonl'}", "--nsamples", "4",
         "--seqlen", "32", "--seed", "0", "--out", str(calib)]
    )  # fmt: skip
    return model_dir, calib


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(folder)
    with torch.no_grad():
        return model(ids).logits


def test_rotation_only_stage_output_equals_dense(stage_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, calib = stage_inputs
    out, stats = tmp_path / "rot", tmp_path / "rot.json"
    prune.main(
        ["--model", str(model_dir), "--calib", str(calib), "--pruner", "none", "--rotation", "denoise",
         "--steps", "10", "--out", str(out), "--stats", str(stats)]
    )  # fmt: skip
    ids = torch.arange(40)[None] % 300
    assert (_logits(out, ids) - _logits(model_dir, ids)).abs().max() <= 1e-4
    record = json.loads(stats.read_text())
    assert len(record["layers"]) == 2
    assert all(layer["entropy_after"] < layer["entropy_before"] for layer in record["layers"])
    assert record["measured_sparsity"] == pytest.approx(0.0, abs=1e-6)
    assert (out / "modeling_denoiserotator.py").exists()


def test_pruned_rotated_stage_keeps_the_pattern_on_reload(
    stage_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, calib = stage_inputs
    out, stats = tmp_path / "pruned", tmp_path / "pruned.json"
    prune.main(
        ["--model", str(model_dir), "--calib", str(calib), "--pruner", "sparsegpt", "--pattern", "2:4",
         "--rotation", "denoise", "--steps", "5", "--sparsegpt-blocksize", "32",
         "--out", str(out), "--stats", str(stats)]
    )  # fmt: skip
    model, _ = load_model(out)
    record = json.loads(stats.read_text())
    assert record["measured_sparsity"] == pytest.approx(0.5, abs=1e-6)
    for layer in model.model.layers:
        weight = layer.mlp.down_proj.weight
        assert bool(((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all())
    assert record["settings"]["pattern"] == "2:4"
    assert all("damping" in layer for layer in record["layers"])


# Config keys an exported folder changes on purpose, and why (files/export.py, rotation/fuse.py):
# - architectures, auto_map, denoiserotator_boundary_layers: a folder with merged boundary
#   rotations names the Rotated* class that applies them (export._patch_config);
# - tie_word_embeddings True -> False: the first rotation is folded into the embedding only, so
#   embedding and lm_head differ (fuse.untie_embeddings);
# - dtype: the folder is saved in the compute dtype (prune_stage).
ROTATED_KEYS = {"architectures", "auto_map", "denoiserotator_boundary_layers"}


@pytest.mark.parametrize(
    "pruner,rotation,dtype,tie",
    [
        ("wanda", "none", "float32", False),
        ("sparsegpt", "denoise", "float32", True),
        ("none", "denoise", "bfloat16", False),
    ],
)
def test_exported_config_keeps_the_sources_configuration(
    stage_inputs: tuple[Path, Path], tmp_path: Path, pruner: str, rotation: str, dtype: str, tie: bool
) -> None:
    from denoiserotator.method.sequential import PruneSettings
    from denoiserotator.settings import ComputeSettings, RotationSettings
    from denoiserotator.testing import tiny_model, tiny_tokenizer

    _, calib = stage_inputs
    source = tmp_path / "source"
    tiny_model("llama", num_layers=2, tie=tie).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    settings = PruneSettings(
        pruner=pruner,
        pattern=None if pruner == "none" else "2:4",
        rotation=RotationSettings(steps=2) if rotation == "denoise" else None,
        compute=ComputeSettings(dtype=dtype),
    )
    prune.prune_stage(source, calib, out, tmp_path / "stats.json", settings, progress=False)
    before = json.loads((source / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    differing = {
        key
        for key in before.keys() | after.keys()
        if before.get(key, "<absent>") != after.get(key, "<absent>")
    }
    expected = set()
    if rotation == "denoise":
        expected |= ROTATED_KEYS
        assert after["architectures"] == ["Rotated" + before["architectures"][0]]
        if tie:
            expected.add("tie_word_embeddings")
            assert after["tie_word_embeddings"] is False
    if dtype != before["dtype"]:
        expected.add("dtype")
        assert after["dtype"] == dtype
    assert differing == expected, {key: (before.get(key), after.get(key)) for key in differing ^ expected}
    assert after["use_cache"] is before["use_cache"] is True
