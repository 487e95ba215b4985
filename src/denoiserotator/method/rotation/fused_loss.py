"""The entropy loss computed fused: one stacked product per input group, with hand-written backward passes."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from denoiserotator.method.rotation.fuse import expand_kv_blocks
from denoiserotator.method.rotation.loss import (
    InputStatistic,
    squared_entropy,
)
from denoiserotator.method.rotation.problem import LayerProblem


class FusedLayerLoss:
    """The same function as `layer_loss` (paper variant), with the work arranged for speed.

    - the five input-side weights (q, k, v, gate, up) are stacked into one matrix, so W·Q is a
      single matmul (`_StackedProduct`);
    - the attn/mlp column factors diag(Qᵀ M Q) take M·Q outside the graph (`_QuadraticDiagonal`);
    - R2 acts per head (batched 64×64 products), never as a dense block-diagonal matrix;
    - o and down share one Qᵀ· matmul; down's column factor is left out, as it cancels in its
      column groups (`loss_statistic_inputs`); the o column factor only needs the per-head
      diagonal blocks of H_o (or of H_λ⁻¹), computed once;
    - the SparseGPT inverse is factored once (`InputStatistic.from_gram`).
    """

    def __init__(
        self, problem: LayerProblem, dtype: torch.dtype = torch.float32, bf16_products: bool = False
    ) -> None:
        """`bf16_products`: the two weight products (W·Q for the stacked input-side weights,
        Qᵀ·[W_o | W_down]) and their gradients take bf16 operands and give bf16 results (the
        kernels accumulate in fp32; the weights are rounded once, here). The statistics'
        products stay in `dtype`: H_λ⁻¹ is ill-conditioned, and bf16 operands there can make a
        rotated diagonal non-positive."""
        w = {name: weight.to(dtype) for name, weight in problem.weights.items()}
        self.operand_dtype = torch.bfloat16 if bf16_products else dtype
        self.num_heads, self.num_kv_heads = problem.num_heads, problem.num_kv_heads
        self.head_dim = problem.head_dim
        # Row blocks sharing a column factor are adjacent, so they are views of one product.
        self.stacked = torch.cat([w["q"], w["k"], w["gate"], w["up"], w["v"]]).to(self.operand_dtype)
        self.sizes = [
            w["q"].shape[0] + w["k"].shape[0],
            w["gate"].shape[0] + w["up"].shape[0],
            w["v"].shape[0],
        ]
        # The attn/mlp column factors need diag(Qᵀ M Q) for a symmetric M (H for Wanda, H_λ⁻¹
        # for SparseGPT). Its gradient 2·(M Q)·diag(g) is elementwise in the product M Q, so M Q
        # is computed outside the graph and M never enters a backward matmul.
        self.quadratic_statistics = {
            key: problem.inputs[key] for key in ("attn", "mlp") if problem.inputs[key].matrix is not None
        }
        quadratics = [_symmetric_matrix(statistic, dtype) for statistic in self.quadratic_statistics.values()]
        self.quadratic = torch.cat(quadratics) if quadratics else None
        heads, hd = self.num_heads, self.head_dim
        self.o_stat = o_stat = problem.inputs["o"]
        if o_stat.matrix is None:
            self.o_blocks = None
        else:
            matrix = o_stat.matrix.to(dtype)
            if o_stat.score == "wanda":  # diagonal blocks H[h, h]
                self.o_blocks = torch.stack(
                    [matrix[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd] for h in range(heads)]
                )
            else:  # diagonal blocks of UᵀU = H_λ⁻¹
                columns = matrix.view(matrix.shape[0], heads, hd).transpose(0, 1)
                self.o_blocks = columns.transpose(-1, -2) @ columns
        self.o_width = w["o"].shape[1]
        self.row_block = problem.row_block
        self.right = torch.cat([w["o"], w["down"]], dim=1).to(self.operand_dtype)  # Qᵀ [W_o | W_down]

    def __call__(self, rotation: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        heads, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        z_qk, z_gate_up, z_v = _StackedProduct.apply(rotation, self.stacked, self.sizes)
        factors: dict[str, torch.Tensor | None] = {"attn": None, "mlp": None}
        if self.quadratic is not None:
            with torch.no_grad():
                products = torch.split(self.quadratic @ rotation.detach(), rotation.shape[0])
            for (key, statistic), product in zip(self.quadratic_statistics.items(), products, strict=True):
                factors[key] = statistic.factor_from_diagonal(_QuadraticDiagonal.apply(rotation, product))
        f_attn, f_mlp = factors["attn"], factors["mlp"]

        # v: R2vᵀ (W_v Q), one hd×hd block per KV head
        v = (blocks.transpose(-1, -2) @ z_v.view(kv, hd, -1)).reshape(kv * hd, -1)
        # o: (Qᵀ W_o) R2o, one block per query head (repeat_kv order); down: Qᵀ W_down
        # autograd casts the gradient back through `.to`: bf16 operands both ways, as W·Q's
        left = (rotation.to(self.right.dtype).T @ self.right).to(rotation.dtype)
        hidden = left.shape[0]
        expanded = expand_kv_blocks(blocks, heads)
        o_left = left[:, : self.o_width].reshape(hidden, heads, hd).transpose(0, 1)
        o = (o_left @ expanded).transpose(0, 1).reshape(hidden, heads * hd)
        f_o = None
        if self.o_blocks is not None:
            diagonal = (expanded * (self.o_blocks @ expanded)).sum(dim=1).reshape(-1)
            f_o = self.o_stat.factor_from_diagonal(diagonal)

        block = self.row_block
        loss = squared_entropy(z_qk, f_attn, rows=True, columns=False, block=block)
        loss = loss + squared_entropy(z_gate_up, f_mlp, rows=True, columns=False, block=block)
        loss = loss + squared_entropy(v, f_attn, rows=True, columns=True, block=block)
        loss = loss + squared_entropy(o, f_o, rows=True, columns=True, block=block)
        loss = loss + squared_entropy(left[:, self.o_width :], None, rows=False, columns=True)
        return loss


def _symmetric_matrix(statistic: InputStatistic, dtype: torch.dtype) -> torch.Tensor:
    """M with diag(Qᵀ M Q) the statistic's rotated diagonal: H (Wanda) or UᵀU = H_λ⁻¹ (SparseGPT)."""
    assert statistic.matrix is not None
    if statistic.score == "wanda":
        return statistic.matrix.to(dtype)
    upper = statistic.matrix.to(torch.float64)
    return (upper.T @ upper).to(dtype)


class _StackedProduct(torch.autograd.Function):
    """The row blocks of `stacked @ rotation` (sizes `sizes`), as views of one matmul; the
    backward accumulates Σ_k W_kᵀ dZ_k into one buffer instead of concatenating the dZ_k
    (measured: the same time either way)."""

    @staticmethod
    def forward(ctx, rotation, stacked, sizes):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(stacked)
        ctx.sizes = sizes
        ctx.dtype = rotation.dtype
        product = (stacked @ rotation.to(stacked.dtype)).to(rotation.dtype)
        return tuple(torch.split(product, sizes))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        (stacked,) = ctx.saved_tensors
        grad_rotation = None
        for block, grad in zip(torch.split(stacked, ctx.sizes), grads, strict=True):
            if grad is None:
                continue
            term = block.T @ grad.to(block.dtype)
            # bf16 products: each block's term is rounded once, then summed in the rotation's dtype
            grad_rotation = term.to(ctx.dtype) if grad_rotation is None else grad_rotation.add_(term)
        return grad_rotation, None, None


class _QuadraticDiagonal(torch.autograd.Function):
    """diag(Qᵀ M Q) = Σ_rows Q ⊙ (M Q) from Q and the product P = M Q (M symmetric, constant);
    the gradient w.r.t. Q is 2·P·diag(g), no matmul."""

    @staticmethod
    def forward(ctx, rotation, product):  # type: ignore[override]
        ctx.save_for_backward(product)
        return (rotation * product).sum(dim=0)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (product,) = ctx.saved_tensors
        return product * (2.0 * grad_output)[None, :], None


@contextlib.contextmanager
def loss_matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """float32 matmuls at `precision` (torch.set_float32_matmul_precision) inside the block on a
    CUDA device, restored afterwards, also when the block raises ("high": TF32; "medium" is
    "high" here, its bf16 weight products being explicit, `FusedLayerLoss(bf16_products=True)`).
    A CPU keeps "highest": there "high" may mean bf16 passes (oneDNN) everywhere, the
    ill-conditioned statistics' products included."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "medium" else precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def bf16_products_for(precision: str, device: torch.device) -> bool:
    """Whether `rotation.matmul_precision` asks for bf16 weight products and `device` runs them
    natively (a CUDA device, or a CPU with bf16 matmul units: AMX there gives ~6x the fp32
    throughput for W·Q at SmolLM2's shapes, docs/studies.md). On a CPU without them, fp32
    (warned once), so that a result never depends on an emulation's speed."""
    return precision == "medium" and (device.type == "cuda" or cpu_has_bf16_matmul())


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU's oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    supported = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not supported:
        logging.getLogger(__name__).warning(
            "rotation.matmul_precision medium: this CPU has no bf16 matmul units; the loss runs in fp32"
        )
    return supported
