"""Wanda pruning (Sun et al.): score |W_ij| * ||X_j||, compared within each output row."""

from __future__ import annotations

import torch

from denoiserotator.method.pruners.patterns import SparsityPattern, lowest_k_mask, nm_keep_mask

__all__ = ["wanda_mask", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(H_jj); H = sum_t x_t x_t^T, so sqrt(H_jj) is the input column norm ||X_j||.

    gram: H (in, in), or only its diagonal (in,) (`gram.collect_grams(..., diagonal=True)`).
    Raises ValueError on other shapes."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if gram.shape not in ((cols, cols), (cols,)):
        raise ValueError(
            f"gram must be ({cols}, {cols}) or its diagonal ({cols},) for {cols} input columns, "
            f"got {tuple(gram.shape)}"
        )
    diagonal = gram.detach() if gram.dim() == 1 else torch.diagonal(gram.detach())
    # clamp: a Gram accumulated in low precision can show tiny negative diagonal entries
    norms = diagonal.to(device=weight.device, dtype=torch.float32).clamp_min(0).sqrt()
    return weight.detach().float().abs() * norms.unsqueeze(0)


def wanda_mask(weight: torch.Tensor, gram: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Bool keep-mask (True = kept): exactly ``int(in * sparsity)`` pruned per row, or N per group of M."""
    scores = wanda_scores(weight, gram)
    if pattern.kind == "nm":
        return nm_keep_mask(scores, pattern.n, pattern.m)  # type: ignore[arg-type]
    return lowest_k_mask(scores, int(weight.shape[1] * pattern.sparsity))
