"""Layer-wise pruning kernels: pure functions from (weight, Gram, pattern) to a pruned weight and its mask.

They never touch models, adapters or the workflow; the engine collects Gram matrices and calls
:func:`prune_weight` per linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denoiserotator.method.pruners.magnitude import magnitude_mask, magnitude_scores
from denoiserotator.method.pruners.patterns import SparsityPattern, lowest_k_mask, nm_keep_mask, parse_pattern
from denoiserotator.method.pruners.sparsegpt import inverse_hessian_cholesky, sparsegpt_prune
from denoiserotator.method.pruners.wanda import wanda_mask, wanda_scores

__all__ = [
    "PRUNERS",
    "PruneResult",
    "SparsityPattern",
    "inverse_hessian_cholesky",
    "lowest_k_mask",
    "magnitude_mask",
    "magnitude_scores",
    "nm_keep_mask",
    "parse_pattern",
    "prune_weight",
    "sparsegpt_prune",
    "wanda_mask",
    "wanda_scores",
]

PRUNERS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneResult:
    weight: torch.Tensor  # same dtype/device as the input weight, zeros where pruned
    mask: torch.Tensor  # bool, True = kept
    damping: float | None = None  # SparseGPT: relative damping actually used, after any retries


def _apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.detach().masked_fill(~mask, 0)


def prune_weight(
    pruner: str,
    weight: torch.Tensor,
    gram: torch.Tensor | None,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> PruneResult:
    """Prune one (out, in) weight with ``pruner``.

    ``gram`` is sum_t x_t x_t^T of the linear's inputs, (in, in), any float dtype; Wanda also
    takes its diagonal alone (in,); magnitude ignores it.
    """
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; supported: {', '.join(PRUNERS)}")
    if pruner == "magnitude":
        mask = magnitude_mask(weight, pattern)
        return PruneResult(weight=_apply_mask(weight, mask), mask=mask)
    if gram is None:
        raise ValueError(f"pruner {pruner!r} needs the Gram matrix of the layer inputs")
    if pruner == "wanda":
        mask = wanda_mask(weight, gram, pattern)
        return PruneResult(weight=_apply_mask(weight, mask), mask=mask)
    return sparsegpt_prune(weight, gram, pattern, blocksize=blocksize, percdamp=percdamp)
