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


def damped(gram: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """H + λI with λ = percdamp·mean(diag H), dead diagonal entries set to 1 first (as SparseGPT)."""
    gram = gram.to(torch.float64).clone()
    diagonal = torch.diagonal(gram)
    diagonal[diagonal == 0] = 1.0
    damping = float(percdamp * diagonal.mean())
    diagonal += damping
    return gram, damping


@dataclass(frozen=True)
class InputStatistic:
    """What a score needs about a linear's inputs, prepared once per layer.

    `matrix` is H (Wanda) or H_λ⁻¹ (SparseGPT); None for magnitude. Under an input
    rotation R the needed diagonal is diag(Rᵀ matrix R).
    """

    score: ScoreName
    matrix: torch.Tensor | None
    damping: float = 0.0
    variant: LossVariant = "paper"

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
            return cls(score, gram.to(torch.float32), variant=variant)
        if score == "sparsegpt":
            damped_gram, damping = damped(gram, percdamp)
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped_gram))
            return cls(score, inverse.to(torch.float32), damping=damping, variant=variant)
        raise ValueError(f"unknown score {score!r}; choose from {SCORES}")

    def column_factor(self, rotation: torch.Tensor | None) -> torch.Tensor | None:
        """Per-input-column multiplier of W² (None = all ones)."""
        if self.matrix is None:
            return None
        matrix = self.matrix.to(rotation.dtype) if rotation is not None else self.matrix
        if rotation is None:
            diagonal = torch.diagonal(matrix)
        else:
            diagonal = (rotation * (matrix @ rotation)).sum(dim=0)
        if self.score == "wanda":
            return diagonal.clamp_min(0.0)
        if self.variant == "reference":
            # The reference code adds λ again after inverting, flattening the diagonal.
            diagonal = diagonal + self.damping
        return 1.0 / diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny)


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
