"""Importance scores of rotated weights and their group entropies (SPEC §3). Pure functions.

The loss of a layer only needs its frozen (norm-folded) weights and the Gram matrices of
the linears' inputs, never the calibration tokens, so its cost does not grow with them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

ScoreName = Literal["magnitude", "wanda", "sparsegpt"]
LossVariant = Literal["paper", "reference"]
SCORES: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class InputStatistic:
    """What a score needs about a linear's inputs, prepared once per layer.

    `matrix` is H for Wanda and, for SparseGPT, the upper Cholesky factor U of the damped
    inverse (UᵀU = H_λ⁻¹, the pruner's own `inverse_hessian_cholesky`, with its damping
    retries); None for magnitude. Under an input rotation R the needed diagonal is
    diag(Rᵀ H R) = Σ_i R ⊙ (H R), or diag(Rᵀ H_λ⁻¹ R) = column norms² of U R.
    `damping` is the relative damping that worked (as the pruner logs it), `shift` the
    absolute λ = damping·mean(diag H) (dead inputs counted as 1).
    """

    score: ScoreName
    matrix: torch.Tensor | None
    damping: float = 0.0
    variant: LossVariant = "paper"
    shift: float = 0.0

    @classmethod
    def from_gram(
        cls,
        score: ScoreName,
        gram: torch.Tensor | None,
        variant: LossVariant = "paper",
        percdamp: float = 0.01,
    ) -> InputStatistic:
        if score == "magnitude":
            return cls(score, None, variant=variant)
        if gram is None:
            raise ValueError(f"score {score!r} needs the Gram matrix of the linear's inputs")
        if score == "wanda":
            if not torch.isfinite(gram).all():
                raise ValueError("gram contains NaN or Inf; the calibration activations overflowed")
            return cls(score, gram.to(torch.float32), variant=variant)
        if score == "sparsegpt":
            # Deferred import: the pruners package is heavier and does not need this module.
            from denoiserotator.method.pruners.sparsegpt import inverse_hessian_cholesky

            upper, dead, damping = inverse_hessian_cholesky(gram, percdamp)
            diagonal = torch.diagonal(gram).to(torch.float64).clone()
            diagonal[dead] = 1.0
            shift = float(damping * diagonal.mean())
            return cls(score, upper.to(torch.float32), damping=damping, variant=variant, shift=shift)
        raise ValueError(f"unknown score {score!r}; choose from {SCORES}")

    def rotated_diagonal(self, rotation: torch.Tensor | None) -> torch.Tensor | None:
        """diag(Rᵀ H R) (Wanda) or diag(Rᵀ H_λ⁻¹ R) (SparseGPT); None for magnitude."""
        if self.matrix is None:
            return None
        matrix = self.matrix.to(rotation.dtype) if rotation is not None else self.matrix
        if self.score == "wanda":
            if rotation is None:
                return torch.diagonal(matrix)
            return (rotation * (matrix @ rotation)).sum(dim=0)
        product = matrix if rotation is None else matrix @ rotation
        return product.square().sum(dim=0)

    def factor_from_diagonal(self, diagonal: torch.Tensor) -> torch.Tensor:
        """The per-column multiplier of W² given the rotated diagonal."""
        if self.score == "wanda":
            return diagonal.clamp_min(0.0)
        if self.variant == "reference":
            # The reference code adds λ again after inverting, flattening the diagonal.
            diagonal = diagonal + self.shift
        return 1.0 / diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny)

    def column_factor(self, rotation: torch.Tensor | None) -> torch.Tensor | None:
        """Per-input-column multiplier of W² (None = all ones)."""
        diagonal = self.rotated_diagonal(rotation)
        return None if diagonal is None else self.factor_from_diagonal(diagonal)


def group_entropy(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over groups (slices along `dim`) of the Shannon entropy of the normalised scores."""
    tiny = torch.finfo(scores.dtype).tiny
    totals = scores.sum(dim=dim, keepdim=True)
    # An all-zero group has entropy 0; dividing by 1 there keeps its gradient finite too.
    probabilities = scores / torch.where(totals > 0, totals, torch.ones_like(totals))
    # Not xlogy: its gradient at p = 0 is -inf·0 = NaN, and real checkpoints (quantised ones
    # especially) have exact zeros. With the clamp, 0·log(tiny) = 0 and the gradient is finite.
    return -(probabilities * torch.log(probabilities.clamp_min(tiny))).sum()


def block_totals(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Per row, the sums of each run of `block` consecutive columns: (rows, cols // block).
    Raises ValueError when the columns do not split into such runs."""
    rows, cols = scores.shape
    if cols % block:
        raise ValueError(f"{cols} input columns do not split into N:M groups of {block}")
    return scores.reshape(rows, cols // block, block).sum(dim=2)


def linear_entropy(
    weight: torch.Tensor, column_factor: torch.Tensor | None, rows: bool, columns: bool, block: int = 0
) -> torch.Tensor:
    """Entropy loss of one (already rotated) weight. Row groups for an input-side rotation,
    column groups for an output-side one, both summed when rotated on both sides.

    `block` = M > 0 (the N:M-aware loss, `rotation.loss_groups: nm`): each row group's entropy
    becomes its conditional entropy given the N:M group, H(row) − H(group totals) =
    Σ_g (T_g / T) H(g), which is zero when each group of M consecutive inputs has one important
    weight and does not reward moving importance between groups, which an N:M pruner cannot
    use (it prunes N of every group). Column groups are unchanged."""
    scores = weight.square()
    if column_factor is not None:
        scores = scores * column_factor[None, :]
    loss = scores.new_zeros(())
    if rows:
        loss = loss + group_entropy(scores, dim=1)
        if block:
            loss = loss - group_entropy(block_totals(scores, block), dim=1)
    if columns:
        loss = loss + group_entropy(scores, dim=0)
    return loss


def _entropy_value_and_grads(
    weight: torch.Tensor,
    factor: torch.Tensor | None,
    rows: bool,
    columns: bool,
    grads: bool,
    block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`linear_entropy` of `weight` and, with `grads`, its gradients w.r.t. the weight and the
    column factor, from one set of elementwise passes.

    With S = W²·c, T = Σ_G S and E = log T − Σ_G S log S / T for each group G, ∂E/∂S =
    (log T − E − log S)/T; an all-zero group has E = 0 and, as in `group_entropy`,
    ∂E/∂S = −log(tiny). ∂/∂W = 2·c·W·∂E/∂S, ∂/∂c_j = Σ_i W_ij²·∂E/∂S_ij. With `block` (row
    groups only), the entropy B of a row's block totals T_g is subtracted: ∂B/∂S_ij =
    (log T − B − log T_g)/T for j in block g.
    """
    tiny = torch.finfo(weight.dtype).tiny
    squares = weight * weight
    scores = squares if factor is None else squares * factor
    log_scores = torch.log(scores.clamp_min(tiny))
    weighted = scores * log_scores
    loss = weight.new_zeros(())
    grad_scores = None
    for dim, wanted in ((1, rows), (0, columns)):
        if not wanted:
            continue
        totals = scores.sum(dim=dim, keepdim=True)
        positive = totals > 0
        safe = torch.where(positive, totals, torch.ones_like(totals))
        log_totals = torch.log(safe)
        entropy = torch.where(positive, log_totals - weighted.sum(dim=dim, keepdim=True) / safe, 0.0)
        loss = loss + entropy.sum()
        if grads:
            term = (log_totals - entropy - log_scores) / safe
            grad_scores = term if grad_scores is None else grad_scores + term
        if dim == 1 and block:
            blocks = block_totals(scores, block)
            log_blocks = torch.log(blocks.clamp_min(tiny))
            mixed = (blocks * log_blocks).sum(dim=1, keepdim=True)
            between = torch.where(positive, log_totals - mixed / safe, 0.0)
            loss = loss - between.sum()
            if grads:
                spread = log_blocks.repeat_interleave(block, dim=1)
                grad_scores = grad_scores - (log_totals - between - spread) / safe
    if not grads or grad_scores is None:
        return loss, None, None
    grad_weight = 2.0 * grad_scores * weight
    if factor is None:
        return loss, grad_weight, None
    return loss, grad_weight * factor, (grad_scores * squares).sum(dim=0)


# Matrices at least this large go through the compiled kernel on a CPU: there the eager passes
# are memory-bound (~6x slower on SmolLM2's 3072 x 576 gate/up block, docs/studies.md), and below it the
# compile time (seconds, once per shape and process) would not pay back.
COMPILE_MIN_ELEMENTS = 1 << 18
_compiled: dict[str, object] = {}


def _value_and_grads(weight, factor, rows, columns, grads, block=0):  # type: ignore[no-untyped-def]
    """`_entropy_value_and_grads`, through torch.compile (inductor) for a large CPU matrix; eager
    otherwise, and from the first compiler failure on (warned once: e.g. no C++ compiler)."""
    if weight.device.type != "cpu" or weight.numel() < COMPILE_MIN_ELEMENTS or _compiled.get("failed"):
        return _entropy_value_and_grads(weight, factor, rows, columns, grads, block)
    if "kernel" not in _compiled:
        _compiled["kernel"] = torch.compile(_entropy_value_and_grads, dynamic=False)
    kernel = _compiled["kernel"]
    try:
        return kernel(weight, factor, rows, columns, grads, block)
    except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
        logging.getLogger(__name__).warning("torch.compile of the entropy kernel failed (%s); eager", error)
        _compiled["failed"] = True
        return _entropy_value_and_grads(weight, factor, rows, columns, grads, block)


class _SquaredEntropy(torch.autograd.Function):
    """`linear_entropy` whose gradient is computed with the value (`_entropy_value_and_grads`):
    no graph, and the backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, weight, factor, rows, columns, block):  # type: ignore[override]
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad_weight, grad_factor = _value_and_grads(weight, factor, rows, columns, grads, block)
        ctx.grads = (grad_weight, grad_factor if ctx.needs_input_grad[1] else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_weight, grad_factor = ctx.grads
        ctx.grads = None
        return (
            None if grad_weight is None else grad_weight * grad_output,
            None if grad_factor is None else grad_factor * grad_output,
            None,
            None,
            None,
        )


def squared_entropy(
    weight: torch.Tensor, column_factor: torch.Tensor | None, rows: bool, columns: bool, block: int = 0
) -> torch.Tensor:
    """Same value and gradient as `linear_entropy`, both computed in the forward pass (compiled
    for large CPU matrices)."""
    return _SquaredEntropy.apply(weight, column_factor, rows, columns, block)
