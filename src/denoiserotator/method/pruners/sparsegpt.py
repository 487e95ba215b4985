"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with error compensation on the remaining columns.

Follows the reference ``fasterprune``: columns are processed left to right in blocks; each pruned weight's
error is spread over the not-yet-processed columns through the upper Cholesky factor of (H + lambda I)^-1,
inside the block at once and to later blocks lazily. Differences from the reference, all deliberate:
exact prune counts with deterministic tie-breaking (the reference's ``score <= threshold`` over-prunes on
ties), the Cholesky factor computed in fp64, and a damping retry when it fails.
"""

from __future__ import annotations

import logging

import torch

from denoiserotator.method.pruners.patterns import SparsityPattern, lowest_k_mask, nm_keep_mask

__all__ = ["sparsegpt_prune", "inverse_hessian_cholesky", "DAMPING_RETRIES"]

log = logging.getLogger(__name__)

DAMPING_RETRIES = 5  # each retry multiplies the relative damping by 10: 0.01 -> 1000 at most


def _damping_schedule(percdamp: float, retries: int) -> list[float]:
    if percdamp > 0:
        return [percdamp * 10.0**k for k in range(retries + 1)]
    # undamped first; if that fails fall back to the usual 1% and grow from there
    return [0.0] + [0.01 * 10.0**k for k in range(retries)]


def inverse_hessian_cholesky(
    gram: torch.Tensor,
    percdamp: float = 0.01,
    *,
    retries: int = DAMPING_RETRIES,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (U, dead, damping): U upper-triangular fp64 with U^T U = (H + lambda I)^-1.

    ``dead`` marks inputs that never fired (H_jj == 0); their diagonal is set to 1 before damping so H stays
    invertible. lambda = damping * mean(diag H); ``damping`` is the relative value that finally worked.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    hess = gram.detach().to(device=device or gram.device, dtype=torch.float64, copy=True)
    if not torch.isfinite(hess).all():
        raise ValueError("gram contains NaN or Inf; the calibration activations overflowed")
    diag = torch.diagonal(hess)  # a view: edits below write into hess
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = diag.mean()
    undamped = diag.clone()
    schedule = _damping_schedule(percdamp, retries)
    # Damping is written onto hess's diagonal in place (no identity, no H + λI copy) and each
    # factor is dropped once the next exists: at most three fp64 (in, in) matrices live at once
    # (6.6 GB each for a 70B down_proj with 28672 inputs), instead of five or six.
    for attempt, damping in enumerate(schedule):
        torch.add(undamped, damping * mean_diag, out=diag)
        chol, info = torch.linalg.cholesky_ex(hess)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.warning("SparseGPT: Cholesky failed at lower damping; used %g", damping)
                return upper, dead, damping
    raise RuntimeError(
        f"SparseGPT: Cholesky of the damped Gram failed even at relative damping {schedule[-1]:g}; "
        "the Gram matrix is far from positive semi-definite"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: SparsityPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
):
    """Prune ``weight`` (out, in) given the input Gram ``gram`` (in, in); returns a ``PruneResult``.

    Unstructured: exactly ``int(block_numel * sparsity)`` weights pruned in every block of ``blocksize``
    columns, chosen by W^2 / diag(U)^2 at the block's start. N:M: the N lowest of each group of M, chosen
    when the sweep reaches the group (so after the compensation of earlier columns). For N:M the block size is
    rounded down to a multiple of M so that no group straddles two blocks.
    """
    from denoiserotator.method.pruners import PruneResult  # deferred: __init__ imports this module

    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"gram must be ({cols}, {cols}) for {cols} input columns, got {tuple(gram.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    nm = pattern.kind == "nm"
    if nm:
        n, m = int(pattern.n), int(pattern.m)  # type: ignore[arg-type]
        if cols % m:
            raise ValueError(f"{cols} input columns are not divisible into groups of {m} for an N:M pattern")
        blocksize = max(m, blocksize // m * m)

    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    upper, dead, damping = inverse_hessian_cholesky(gram, percdamp, device=weight.device)
    hinv = upper.to(work_dtype)
    hinv_diag = torch.diagonal(hinv)

    W = weight.detach().to(work_dtype, copy=True)
    W[:, dead] = 0  # an input that is always zero carries no information; OBS would otherwise divide by ~0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    zero = torch.zeros((), dtype=work_dtype, device=weight.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        d1 = hinv_diag[i1:i2]
        if nm:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            scores = W1.square() / d1.square().unsqueeze(0)
            k = int(W1.numel() * pattern.sparsity)
            keep1 = lowest_k_mask(scores.reshape(-1), k).reshape(W1.shape)
        for i in range(i2 - i1):
            if nm and i % m == 0:
                group = slice(i, i + m)
                keep1[:, group] = nm_keep_mask(W1[:, group].square() / d1[group].square().unsqueeze(0), n, m)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, zero)
            err = (w - q) / H1[i, i]
            W1[:, i:].addr_(err, H1[i, i:], alpha=-1)  # rank-1 update in place, no (rows, cols) temporary
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]

    return PruneResult(weight=W.to(weight.dtype), mask=keep, damping=damping)
