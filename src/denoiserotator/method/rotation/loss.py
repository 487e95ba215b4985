"""Importance scores of rotated weights and their group entropies (SPEC §3). Pure functions.

The loss of a layer only needs its frozen (norm-folded) weights and the Gram matrices of
the linears' inputs, never the calibration tokens, so its cost does not grow with them.
"""

from __future__ import annotations

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


def linear_entropy(
    weight: torch.Tensor, column_factor: torch.Tensor | None, rows: bool, columns: bool
) -> torch.Tensor:
    """Entropy loss of one (already rotated) weight. Row groups for an input-side rotation,
    column groups for an output-side one, both summed when rotated on both sides."""
    scores = weight.square()
    if column_factor is not None:
        scores = scores * column_factor[None, :]
    loss = scores.new_zeros(())
    if rows:
        loss = loss + group_entropy(scores, dim=1)
    if columns:
        loss = loss + group_entropy(scores, dim=0)
    return loss


class _SquaredEntropy(torch.autograd.Function):
    """`linear_entropy` with a hand-written backward: few passes over the matrix, no graph.

    With S = W²·c, T = Σ_G S and E = log T − Σ_G S log S / T for each group G, the gradient
    is ∂E/∂S = (log T − E − log S)/T; an all-zero group has E = 0 and, as in
    `group_entropy`, ∂E/∂S = −log(tiny).
    """

    @staticmethod
    def forward(ctx, weight, factor, rows, columns):  # type: ignore[override]
        # In-place where possible: on a CPU these passes are memory-bound, not FLOP-bound.
        scores = weight.square()
        if factor is not None:
            scores.mul_(factor)
        log_scores = scores.clamp_min(torch.finfo(scores.dtype).tiny).log_()
        weighted_scores = scores * log_scores
        loss = scores.new_zeros(())
        coefficients = []
        for dim, wanted in ((1, rows), (0, columns)):
            if not wanted:
                continue
            weighted = weighted_scores.sum(dim=dim)
            totals = scores.sum(dim=dim)
            positive = totals > 0
            safe = torch.where(positive, totals, torch.ones_like(totals))
            log_totals = safe.log()
            entropy = torch.where(positive, log_totals - weighted / safe, 0.0)
            loss = loss + entropy.sum()
            coefficients.append((dim, log_totals - entropy, safe.reciprocal()))
        ctx.coefficients = coefficients
        ctx.save_for_backward(weight, factor, log_scores)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        weight, factor, log_scores = ctx.saved_tensors
        # 2·grad_output rides on the per-group vectors, so no full-size pass multiplies by it.
        scale = 2.0 * grad_output
        twice_grad_scores = None
        for dim, offset, reciprocal in ctx.coefficients:
            term = torch.sub(offset.unsqueeze(dim), log_scores).mul_((reciprocal * scale).unsqueeze(dim))
            twice_grad_scores = term if twice_grad_scores is None else twice_grad_scores.add_(term)
        # ∂/∂W = 2·g·c·W and ∂/∂c_j = Σ_i g_ij W_ij², both from 2·g·W
        twice_grad_times_weight = twice_grad_scores.mul_(weight)
        grad_weight = grad_factor = None
        if ctx.needs_input_grad[1]:
            grad_factor = (twice_grad_times_weight * weight).sum(dim=0).mul_(0.5)
        if ctx.needs_input_grad[0]:
            grad_weight = twice_grad_times_weight if factor is None else twice_grad_times_weight.mul_(factor)
        return grad_weight, grad_factor, None, None


def squared_entropy(
    weight: torch.Tensor, column_factor: torch.Tensor | None, rows: bool, columns: bool
) -> torch.Tensor:
    """Same value and gradient as `linear_entropy`, computed in fewer passes (fused backward)."""
    return _SquaredEntropy.apply(weight, column_factor, rows, columns)
