"""Norm folding and exact fusion of R1 (per layer) and R2 (per KV head) rotations (SPEC §2).

Weights are (out, in) as in `nn.Linear`: a rotation of a linear's input multiplies W on the
right, a rotation of its output multiplies W on the left. All products are done in float64
and cast back, so fusing does not add error beyond the storage dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import LayerAdapter, ModelAdapter


def _set_weight(linear: nn.Module, new_weight: torch.Tensor) -> None:
    linear.weight.data = new_weight.to(dtype=linear.weight.dtype, device=linear.weight.device).contiguous()


def _fold_scale_into(norm: nn.Module, linears: list[nn.Linear]) -> None:
    gamma = norm.weight.data.to(torch.float64)
    for linear in linears:
        _set_weight(linear, linear.weight.data.to(torch.float64) * gamma[None, :])
    # A weightless RMSNorm commutes with any orthogonal matrix; that is what makes R1 exact.
    norm.weight.data.fill_(1.0)


def fold_layer_norms(layer: LayerAdapter) -> None:
    """Fold both RMSNorm scales of a decoder layer into the linears they feed."""
    _fold_scale_into(layer.input_norm, [layer.linear(name) for name in ("q", "k", "v")])
    _fold_scale_into(layer.post_attention_norm, [layer.linear(name) for name in ("gate", "up")])


def expand_kv_blocks(blocks: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-KV-head blocks → per-query-head blocks, in Hugging Face `repeat_kv` order.

    `repeat_kv` maps query head h to KV head h // (num_heads / num_kv_heads).
    """
    num_kv_heads = blocks.shape[0]
    return blocks.repeat_interleave(num_heads // num_kv_heads, dim=0)


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.unbind(0))


def fuse_layer_rotation(
    layer: LayerAdapter, rotation: torch.Tensor, head_blocks: torch.Tensor | None, num_heads: int
) -> None:
    """Fuse R1 (`rotation`, d×d) and R2 (`head_blocks`, n_kv×hd×hd) into a norm-folded layer.

    Afterwards the layer maps `h @ rotation` to `layer(h) @ rotation` exactly.
    """
    q = rotation.to(torch.float64)
    w = {name: lin.weight.data.to(torch.float64) for name, lin in layer.linears().items()}
    if head_blocks is None:
        r2v = r2o = None
    else:
        r2v = block_diag(head_blocks.to(torch.float64))
        r2o = block_diag(expand_kv_blocks(head_blocks.to(torch.float64), num_heads))

    for name in ("q", "k", "gate", "up"):
        _set_weight(layer.linear(name), w[name] @ q)
    v_weight = w["v"] @ q
    o_weight = q.T @ w["o"]
    if r2v is not None:
        v_weight = r2v.T @ v_weight
        o_weight = o_weight @ r2o
        v_bias = layer.linear("v").bias
        if v_bias is not None:
            v_bias.data = (r2v.T @ v_bias.data.to(torch.float64)).to(v_bias.dtype)
    _set_weight(layer.linear("v"), v_weight)
    _set_weight(layer.linear("o"), o_weight)
    _set_weight(layer.linear("down"), q.T @ w["down"])
    # Output biases live in the residual stream, which is rotated too.
    for name in ("o", "down"):
        bias = layer.linear(name).bias
        if bias is not None:
            bias.data = (q.T @ bias.data.to(torch.float64)).to(bias.dtype)


def untie_embeddings(adapter: ModelAdapter) -> bool:
    """Give lm_head its own weight when it shares the embedding's. Returns whether it did."""
    if not adapter.tied_embeddings:
        return False
    lm_head = adapter.lm_head
    lm_head.weight = nn.Parameter(lm_head.weight.data.clone())
    adapter.config.tie_word_embeddings = False
    # transformers 5 re-ties on save/load from this mapping unless it is cleared.
    if hasattr(adapter.model, "_tied_weights_keys"):
        adapter.model._tied_weights_keys = {} if isinstance(adapter.model._tied_weights_keys, dict) else []
    return True


def merge_boundary_rotations(
    adapter: ModelAdapter, rotations: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Turn per-layer entry/exit rotations into one matrix per layer boundary.

    Layer i expects its input as h·Q_i and returns its output as h·Q_i. Instead of
    rotating back after every layer, the boundary between i-1 and i applies Q_{i-1}ᵀQ_i;
    Q_0 is folded into the embedding and Q_{L-1}ᵀ (with the final norm's scale) into
    lm_head. Tied embeddings are untied first (folding one rotation into a shared matrix
    cannot be exact on both sides). Returns the boundary list (None where identity).
    """
    if all(rotation is None for rotation in rotations):
        return [None] * len(rotations)
    untie_embeddings(adapter)
    eye = torch.eye(adapter.hidden_size, dtype=torch.float64)
    dense = [eye if rotation is None else rotation.to(torch.float64) for rotation in rotations]

    embedding = adapter.embedding
    embedding.weight.data = (embedding.weight.data.to(torch.float64) @ dense[0]).to(embedding.weight.dtype)

    boundary: list[torch.Tensor | None] = [None]
    for previous, current in zip(dense[:-1], dense[1:], strict=True):
        boundary.append((previous.T @ current).to(torch.float32))

    _fold_scale_into(adapter.final_norm, [adapter.lm_head])
    lm_head = adapter.lm_head
    lm_head.weight.data = (lm_head.weight.data.to(torch.float64) @ dense[-1]).to(lm_head.weight.dtype)
    return boundary


class RotatedLayer(nn.Module):
    """The unmerged form: rotate into the layer's basis on entry and back on exit."""

    def __init__(self, layer: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("rotation", rotation)

    def __getattr__(self, name: str) -> object:
        # The decoder stack reads attributes such as `attention_type` off its layers.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        output = self.layer(rotate(hidden_states, self.rotation), *args, **kwargs)
        if isinstance(output, tuple):
            return (rotate(output[0], self.rotation.T), *output[1:])
        return rotate(output, self.rotation.T)


def rotate(hidden: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """hidden (..., d) @ rotation (d, d), computed in fp32 for bf16/fp16 activations and returned
    in hidden's dtype, as the exported `BoundaryRotation` does: an orthogonal matrix rounded to
    bf16 is visibly non-orthogonal, so a bf16 product would differ from the exported model."""
    dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    return (hidden.to(dtype) @ rotation.to(device=hidden.device, dtype=dtype)).to(hidden.dtype)
