"""The prune stage end to end on a saved tiny model: files written, loadable, exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denoiserotator import calibrate, prune
from denoiserotator.export import load_model
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
