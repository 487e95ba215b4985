"""Fused linears (Phi-3): split in memory, saved fused, pruned as the unfused linears are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from denoiserotator.files.export import folder_sparsity, measured_sparsity, save_model
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.method.adapters.fused import SplitLinear
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.settings import PruningSettings, RotationSettings
from denoiserotator.testing import tiny_model, tiny_tokenizer


def test_a_split_linear_computes_and_saves_what_the_fused_one_does() -> None:
    fused = nn.Linear(8, 10, bias=True)
    split = SplitLinear(fused, {"a": 6, "b": 4})
    x = torch.randn(3, 8)
    assert torch.allclose(split(x), fused(x), atol=1e-6)
    state = split.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], fused.weight) and torch.equal(state["bias"], fused.bias)
    with torch.no_grad():
        split.b.weight.zero_()
    other = SplitLinear(nn.Linear(8, 10, bias=True), {"a": 6, "b": 4})
    other.load_state_dict(split.state_dict())
    assert torch.equal(other.b.weight, torch.zeros(4, 8)) and torch.equal(other.a.weight, fused.weight[:6])


def test_a_split_model_saves_the_stock_fused_layout(tmp_path: Path) -> None:
    model = tiny_model("phi3")
    stock_keys = set(model.state_dict())
    get_adapter(model)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, SplitLinear)
    assert set(model.state_dict()) == stock_keys
    get_adapter(model)  # splitting twice is a no-op
    assert set(model.state_dict()) == stock_keys


def _phi3_from_llama(llama: nn.Module) -> nn.Module:
    """A Phi-3 with full rotary and the Llama's weights, q/k/v and gate/up stacked in the fused order."""
    phi3 = tiny_model("phi3", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    state = {}
    for key, value in llama.state_dict().items():
        if any(f"self_attn.{p}_proj" in key for p in "kv") or "mlp.up_proj" in key:
            continue
        if "self_attn.q_proj" in key:
            prefix = key.split("self_attn.q_proj")[0]
            value = torch.cat([llama.state_dict()[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"])
            key = f"{prefix}self_attn.qkv_proj.weight"
        elif "mlp.gate_proj" in key:
            prefix = key.split("mlp.gate_proj")[0]
            value = torch.cat([llama.state_dict()[f"{prefix}mlp.{p}_proj.weight"] for p in ("gate", "up")])
            key = f"{prefix}mlp.gate_up_proj.weight"
        state[key] = value
    phi3.load_state_dict(state, strict=True)
    return phi3


@pytest.mark.parametrize(
    ("pruner", "pattern", "rotation"),
    [
        ("magnitude", "50%", "denoise"),
        ("wanda", "2:4", "denoise"),
        ("sparsegpt", "50%", "none"),
        ("sparsegpt", "2:4", "denoise"),
    ],
)
def test_fused_weights_are_pruned_exactly_as_the_unfused_ones(
    pruner: str, pattern: str, rotation: str
) -> None:
    """The same weights as LLaMA's separate linears and as Phi-3's fused ones give the same
    function, the same rotations and the same pruned weights, block for block."""
    llama = tiny_model("llama", num_layers=2)
    phi3 = _phi3_from_llama(llama)
    ids = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(phi3(ids).logits, llama(ids).logits, atol=1e-5)
    settings = PruneSettings(
        pruner=pruner,
        pattern=pattern,
        rotation=RotationSettings(steps=5) if rotation == "denoise" else None,
        pruning=PruningSettings(sparsegpt_blocksize=32),
    )
    pruned_llama = run_pipeline(llama, ids, settings, progress=False)
    pruned_phi3 = run_pipeline(phi3, ids, settings, progress=False)
    for ours, theirs in zip(pruned_phi3.rotations, pruned_llama.rotations, strict=True):
        assert (ours is None) == (theirs is None) == (rotation == "none")
        assert ours is None or torch.allclose(ours, theirs, atol=1e-4)
    a, b = get_adapter(pruned_phi3.model), get_adapter(pruned_llama.model)
    for index in range(a.num_layers):
        for name in LINEAR_NAMES:
            ours, theirs = a.layer(index).linear(name).weight, b.layer(index).linear(name).weight
            assert torch.equal(ours == 0, theirs == 0), (index, name)
            assert torch.allclose(ours, theirs, atol=1e-4), (index, name)


def test_a_saved_phi3_folder_counts_sparsity_per_block(tmp_path: Path) -> None:
    model = tiny_model("phi3")
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.layer(0).linear("k").weight.zero_()
        adapter.layer(1).linear("up").weight[::2] = 0
    save_model(model, tiny_tokenizer(), tmp_path / "phi3", boundary=[None, None])
    from_folder = folder_sparsity(tmp_path / "phi3")
    in_memory = measured_sparsity(model)
    assert from_folder["per_linear"] == pytest.approx(in_memory["per_linear"])
    assert from_folder["per_linear"]["k"] == pytest.approx(0.5) and from_folder["per_linear"]["q"] == 0.0
