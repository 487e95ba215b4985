"""Norm folding and exact fusion of R1 (per layer) and R2 (per KV head) rotations (SPEC §2).

Weights are (out, in) as in `nn.Linear`: a rotation of a linear's input multiplies W on the
right, a rotation of its output multiplies W on the left. All products are done in float64
and cast back, so fusing does not add error beyond the storage dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from denoiserotator.files.modeling_denoiserotator import RotatedOutputNorm
from denoiserotator.method.adapters import LayerAdapter, ModelAdapter

# Rows (or columns) per fp64 product: bounds the temporaries to a slice of one weight instead of
# whole fp64 copies (a 70B MLP weight is 1.9 GB in fp64, a 128k-token embedding 8 GB).
_CHUNK = 4096


def _set_weight(linear: nn.Module, new_weight: torch.Tensor) -> None:
    linear.weight.data = new_weight.to(dtype=linear.weight.dtype, device=linear.weight.device).contiguous()


def _right_multiply(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """weight (n, d) @ rotation (d, d), in fp64 `_CHUNK` rows at a time, in weight's dtype."""
    rotation64 = rotation.to(device=weight.device, dtype=torch.float64)
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], _CHUNK):
        rows = weight[start : start + _CHUNK].to(torch.float64)
        out[start : start + _CHUNK] = (rows @ rotation64).to(weight.dtype)
    return out


def _left_multiply_transposed(rotation: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rotationᵀ (d, d) @ weight (d, n), in fp64 `_CHUNK` columns at a time, in weight's dtype."""
    qt = rotation.to(device=weight.device, dtype=torch.float64).T
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[1], _CHUNK):
        out[:, start : start + _CHUNK] = (qt @ weight[:, start : start + _CHUNK].to(torch.float64)).to(
            weight.dtype
        )
    return out


def _fold_scale_into(norm: nn.Module, linears: list[nn.Linear], offset: float = 0.0) -> None:
    """Fold the norm's scale `offset + weight` into the linears' input columns; leave scale 1."""
    gamma = norm.weight.data.to(torch.float64) + offset
    for linear in linears:
        weight = linear.weight.data
        scaled = torch.empty_like(weight)
        for start in range(0, weight.shape[0], _CHUNK):
            rows = weight[start : start + _CHUNK].to(torch.float64) * gamma[None, :]
            scaled[start : start + _CHUNK] = rows.to(weight.dtype)
        linear.weight.data = scaled
    # A weightless RMSNorm commutes with any orthogonal matrix; that is what makes R1 exact.
    norm.weight.data.fill_(1.0 - offset)


def fold_layer_norms(layer: LayerAdapter) -> None:
    """Fold both RMSNorm scales of a decoder layer into the linears they feed."""
    offset = layer.norm_offset
    _fold_scale_into(layer.input_norm, [layer.linear(name) for name in ("q", "k", "v")], offset)
    _fold_scale_into(layer.post_attention_norm, [layer.linear(name) for name in ("gate", "up")], offset)


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

    Afterwards the layer maps `h @ rotation` to `layer(h) @ rotation` exactly. Products are in
    fp64, one linear and one slice of it at a time (rows for input-side rotations, columns for
    output-side ones, one head for R2), so the temporaries stay far below one fp64 copy of the
    layer; R2 is applied block by block, never as a dense d×d block-diagonal matrix.
    """
    for name in ("q", "k", "gate", "up"):
        linear = layer.linear(name)
        linear.weight.data = _right_multiply(linear.weight.data, rotation)
    v, o = layer.linear("v"), layer.linear("o")
    q64 = rotation.to(device=v.weight.device, dtype=torch.float64)
    if head_blocks is None:
        v.weight.data = _right_multiply(v.weight.data, rotation)
        o.weight.data = _left_multiply_transposed(rotation, o.weight.data)
    else:
        blocks = head_blocks.to(device=v.weight.device, dtype=torch.float64)
        head_dim = blocks.shape[-1]
        # v's rows of KV head h: B_hᵀ W_v[h] Q; o's columns of query head j: Qᵀ W_o[:, j] B_{kv(j)}.
        new_v = torch.empty_like(v.weight.data)
        for head, block in enumerate(blocks):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            new_v[rows] = (block.T @ (v.weight.data[rows].to(torch.float64) @ q64)).to(new_v.dtype)
        v.weight.data = new_v
        if v.bias is not None:
            bias = v.bias.data.to(torch.float64).reshape(len(blocks), head_dim)
            v.bias.data = torch.einsum("hij,hi->hj", blocks, bias).reshape(-1).to(v.bias.dtype)
        per_query = expand_kv_blocks(blocks, num_heads)
        new_o = torch.empty_like(o.weight.data)
        for head, block in enumerate(per_query):
            columns = slice(head * head_dim, (head + 1) * head_dim)
            new_o[:, columns] = (q64.T @ o.weight.data[:, columns].to(torch.float64) @ block).to(new_o.dtype)
        o.weight.data = new_o
    down = layer.linear("down")
    down.weight.data = _left_multiply_transposed(rotation, down.weight.data)
    # Output biases live in the residual stream, which is rotated too.
    for linear in (o, down):
        if linear.bias is not None:
            linear.bias.data = (q64.T @ linear.bias.data.to(torch.float64)).to(linear.bias.dtype)
    # A norm on a sublayer's output (Gemma's post norms) now receives yQ. RMS(yQ) = RMS(y), so
    # norm(y)·Q = (yQ / RMS(yQ))·Qᵀ·diag(s)·Q: the scale s becomes a d×d matrix (docs/extending.md).
    for path in layer.output_norm_paths:
        norm = layer.layer.get_submodule(path)
        layer.replace(path, RotatedOutputNorm.from_norm(norm, q64, layer.norm_offset))


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
    embedding = adapter.embedding
    if rotations[0] is not None:
        embedding.weight.data = _right_multiply(embedding.weight.data, rotations[0])

    # One boundary at a time, each in fp64 from the two fp32 rotations it joins: at most two
    # d×d fp64 temporaries live at once (512 MB at d = 8192), not one per layer, and an
    # identity (None) is never materialised.
    boundary: list[torch.Tensor | None] = [None]
    for previous, current in zip(rotations[:-1], rotations[1:], strict=True):
        if previous is None and current is None:
            boundary.append(None)
        elif previous is None:
            boundary.append(current.to(torch.float32, copy=True))
        elif current is None:
            boundary.append(previous.T.to(torch.float32, copy=True).contiguous())
        else:
            boundary.append((previous.to(torch.float64).T @ current.to(torch.float64)).to(torch.float32))

    _fold_scale_into(adapter.final_norm, [adapter.lm_head], adapter.norm_offset)
    lm_head = adapter.lm_head
    if rotations[-1] is not None:
        lm_head.weight.data = _right_multiply(lm_head.weight.data, rotations[-1])
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
