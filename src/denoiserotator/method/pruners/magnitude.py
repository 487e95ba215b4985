"""Magnitude pruning: drop the smallest |W|, one threshold per matrix (or per group of M for N:M)."""

from __future__ import annotations

import torch

from denoiserotator.method.pruners.patterns import SparsityPattern, lowest_k_mask, nm_keep_mask

__all__ = ["magnitude_mask", "magnitude_scores"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    # |W| orders weights exactly like W^2 and is exact after the fp32 upcast of any half-precision weight.
    return weight.detach().float().abs()


def magnitude_mask(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Bool keep-mask (True = kept) of ``weight`` (out, in).

    Unstructured: exactly ``int(numel * sparsity)`` weights pruned over the whole matrix; N:M: the N smallest
    of every M consecutive inputs of each row. Ties go to the lower flat index.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    scores = magnitude_scores(weight)
    if pattern.kind == "nm":
        return nm_keep_mask(scores, pattern.n, pattern.m)  # type: ignore[arg-type]
    k = int(weight.numel() * pattern.sparsity)
    return lowest_k_mask(scores.reshape(-1), k).reshape(weight.shape)
