"""The table of failure cases (docs/failures.md) stays true: every test it names exists, and the model
shapes it lists as handled (MHA, MQA, head_dim != hidden/heads, Llama biases, mixed
sliding-window layers) are tried here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.settings import PruningSettings, RotationSettings
from denoiserotator.testing import tiny_model
from tests.method.test_rotation_fuse import apply_boundary_hooks

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "mha": ("llama", {"num_key_value_heads": 4}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
    "head_dim_24_not_hidden_over_heads": ("llama", {"head_dim": 24}),
    "llama_attention_and_mlp_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2_mixed_sliding_window_layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_shapes_rotate_exactly_and_prune_to_the_pattern(shape: str) -> None:
    family, overrides = SHAPES[shape]
    model = tiny_model(family, num_layers=3, **overrides)
    if shape.startswith("qwen2_mixed"):
        assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids = torch.randint(3, 384, (4, 20), generator=torch.Generator().manual_seed(0))  # 20 > window 8
    with torch.no_grad():
        expected = model(ids).logits
    settings = PruneSettings(
        pruner="none", pattern=None, rotation=RotationSettings(steps=5, loss_score="wanda")
    )
    result = run_pipeline(model, ids, settings, progress=False)
    apply_boundary_hooks(result.model, result.boundary)
    with torch.no_grad():
        assert (result.model(ids).logits - expected).abs().max().item() <= 1e-4

    model = tiny_model(family, num_layers=3, **overrides)
    settings = PruneSettings(
        pruner="sparsegpt",
        pattern="2:4",
        rotation=RotationSettings(steps=3),
        pruning=PruningSettings(sparsegpt_blocksize=32),
    )
    result = run_pipeline(model, ids, settings, progress=False)
    adapter = get_adapter(result.model)
    for index in range(adapter.num_layers):
        for name in LINEAR_NAMES:
            weight = adapter.layer(index).linear(name).weight.data
            assert bool(((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all()), (index, name)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def _readme_failure_table() -> list[list[str]]:
    text = (ROOT / "docs" / "failures.md").read_text()
    match = re.search(r"^# Failure cases\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "docs/failures.md has no '# Failure cases' heading"
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    header, rule, *body = rows
    assert [cell.strip() for cell in header.strip("|").split("|")][-1] == "test that keeps it true"
    assert set(rule.replace("|", "").strip()) <= {"-", ":", " "}
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in body]


def test_readme_failure_table_names_tests_that_exist() -> None:
    rows = _readme_failure_table()
    assert len(rows) >= 15
    named = 0
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row[-1])
        assert refs, f"row {row[0]!r} names no test"
        for path, name in refs:
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            function = getattr(module, name, None)
            assert callable(function) and name.startswith("test_"), f"{path}::{name} (row {row[0]!r})"
            named += 1
    assert named >= len(rows)
