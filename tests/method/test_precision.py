"""bf16 calibration computes the model's own function (issue 11 item 1).

A model loaded with `from_pretrained(dtype=torch.bfloat16)` keeps its rotary `inv_freq` in fp32;
the engine must not round it (nor any other buffer) when it moves model parts to the compute
dtype, or every statistic is fitted to a model with drifted RoPE phases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from denoiserotator.files.export import load_model
from denoiserotator.files.modeling_denoiserotator import BOUNDARY_ATTR, attach_boundary_rotations
from denoiserotator.method.adapters import get_adapter
from denoiserotator.method.engine import capture_layer_inputs, run_layer
from denoiserotator.method.precision import fp32_modules, place
from denoiserotator.method.rotation.fuse import RotatedLayer
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.settings import ComputeSettings, RotationSettings
from denoiserotator.testing import FAMILIES, tiny_model, tiny_tokenizer

# Realistic RoPE bases: LLaMA-3 uses 5e5, Qwen2.5, Qwen3 and Mistral-7B-v0.2+ 1e6.
ROPE_THETA = {"llama": 5e5, "qwen2": 1e6, "mistral": 1e6, "qwen3": 1e6, "phi3": 1e4}
# Gemma 3: one RoPE per layer type (local 1e4, global 1e6 as in its published configs).
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
}
POSITIONS = 2048


def save_long_context_model(family: str, folder: Path, num_layers: int = 3) -> Path:
    """A tiny model with a realistic rope_theta and room for 2048 positions, saved as an HF folder.
    Narrow (hidden 32) so 2048-token forwards stay fast on a CPU."""
    model = tiny_model(
        family,
        num_layers=num_layers,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2 * POSITIONS,
        rope_parameters=GEMMA3_ROPE
        if family == "gemma3_text"
        else {"rope_type": "default", "rope_theta": ROPE_THETA[family]},
    )
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def rotary_buffers(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: buffer.dtype for name, buffer in model.named_buffers() if "inv_freq" in name}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_engine_reproduces_the_models_own_bf16_forward(family: str, tmp_path: Path) -> None:
    """Layer by layer, the engine's bf16 hidden states equal the bf16 model's own forward over 2048
    positions, bit for bit. Tolerance 0, and why: the engine runs the very same layer modules on
    the same tensors with the same batch shape (batch_size = nsamples), so on a deterministic
    backend every kernel sees identical inputs; and any tolerance would have to be below one
    bf16 ulp, since rounding inv_freq to bf16 shows up on this tiny model as a deviation of one
    ulp of the largest entry (≈0.5% in relative Frobenius norm, growing with depth)."""
    model, _ = load_model(save_long_context_model(family, tmp_path / family), dtype=torch.bfloat16)
    assert set(rotary_buffers(model).values()) == {torch.float32}  # what from_pretrained keeps
    ids = torch.randint(
        0, model.config.vocab_size, (2, POSITIONS), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(
        adapter, ids, batch_size=2, device=torch.device("cpu"), dtype=torch.bfloat16
    )
    hidden = inputs.hidden
    assert hidden[0].dtype == torch.bfloat16
    assert torch.equal(torch.cat(hidden), reference[0])
    for index in range(adapter.num_layers - 1):  # the last hidden_states entry is after the final norm
        hidden = run_layer(adapter.layers[index], hidden, inputs.layer_kwargs[index])
        difference = (torch.cat(hidden).float() - reference[index + 1].float()).abs().max().item()
        assert difference == 0.0, (family, index, difference)
    assert set(rotary_buffers(model).values()) == {torch.float32}  # capturing left it as it was


def test_pipeline_keeps_the_buffers_the_model_keeps(tmp_path: Path) -> None:
    """A bf16 rotate+prune run leaves inv_freq in fp32, so the in-memory result (evaluated by
    tests and notebooks without a save/load round trip) is still the model's own function."""
    model, _ = load_model(
        save_long_context_model("qwen2", tmp_path / "m", num_layers=2), dtype=torch.bfloat16
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(
        pruner="wanda",
        pattern="50%",
        rotation=RotationSettings(steps=2),
        compute=ComputeSettings(device="cpu", dtype="bfloat16"),
    )
    result = run_pipeline(model, ids, settings, progress=False, merge_boundaries=False)
    assert set(rotary_buffers(result.model).values()) == {torch.float32}
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    # The unmerged form keeps each R1 in fp32 (a buffer of RotatedLayer).
    assert all(isinstance(layer, RotatedLayer) for layer in get_adapter(result.model).layers)
    assert {layer.rotation.dtype for layer in get_adapter(result.model).layers} == {torch.float32}


def test_place_casts_parameters_only_and_respects_keep_in_fp32() -> None:
    """`place` casts floating-point parameters, never buffers, and leaves the modules a class
    keeps in fp32 (here the boundary rotations, `_keep_in_fp32_modules_strict`) alone."""
    model = tiny_model("llama", num_layers=2)
    attach_boundary_rotations(model, [None, torch.eye(model.config.hidden_size)])
    keep = fp32_modules(model, torch.bfloat16)
    assert keep == (BOUNDARY_ATTR,)
    assert fp32_modules(model, torch.float32) == ()
    place(model, "cpu", torch.bfloat16, keep)
    boundary = getattr(model.model.layers[1], BOUNDARY_ATTR).weight
    assert boundary.dtype == torch.float32
    assert set(rotary_buffers(model).values()) == {torch.float32}
    others = {p.dtype for name, p in model.named_parameters() if BOUNDARY_ATTR not in name}
    assert others == {torch.bfloat16}


def test_rotated_layer_rotates_in_fp32() -> None:
    """RotatedLayer (the unmerged form, and the pipeline's propagation) applies R1 in fp32 as the
    exported BoundaryRotation does: an orthogonal matrix rounded to bf16 is not orthogonal, so a
    bf16 product would make the pipeline's activations differ from the exported model's."""
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(64, 64))[0]
    layer = RotatedLayer(torch.nn.Identity(), rotation)
    hidden = torch.randn(3, 64).to(torch.bfloat16)
    expected = ((hidden.float() @ rotation).to(torch.bfloat16).float() @ rotation.T).to(torch.bfloat16)
    assert torch.equal(layer(hidden), expected)
