"""Layer-wise refinement after pruning: lower ‖(W − Ŵ)X‖² at the pruner's exact sparsity pattern.

Any pruner's (mask, kept values) can be refined on the objective the Gram already gives,

    f(Ŵ) = Σ_r (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ,   H = Σ_t x_t x_tᵀ (the Gram the pruner saw),

row by row (the rows are independent). Two methods:

- ``lsq``: the least-squares update of the kept weights on the pruner's mask,
  ŵ_S = H_SS⁻¹ (H w)_S for the kept set S of each row (Wanda and Magnitude never update; even
  SparseGPT's one left-to-right sweep is not the minimiser on its own mask).
- ``swaps``: 1-swap mask search, then ``lsq`` on the final mask. Each swap prunes a kept weight
  i and reinstates a pruned weight j *of the same row* (of the same M-group for N:M), so every
  row's count, and every N:M group's, is unchanged. With d = w − ŵ and g = H d, pruning i and
  reinstating j at its best value v = (g_j + ŵ_i H_ij) / H_jj changes f by exactly

      Δ_ij = 2 ŵ_i g_i + ŵ_i² H_ii − (g_j + ŵ_i H_ij)² / H_jj,

  (SparseSwaps, arXiv 2512.10922, reinstates w_j; the best value is never worse). Per step and
  row the best swap among the `candidates` cheapest prunes × the `candidates` best reinstates
  (all pairs of a group for N:M) is taken when Δ < 0; a row stops when none lowers f.

Search and least squares use the damped Gram H + λI (λ = percdamp · mean diag H, SparseGPT's
damping) so that every solve is well posed; a row whose *undamped* objective would rise is
returned unchanged, so f never rises. All arithmetic is fp64, in row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from denoiserotator.method.pruners.patterns import SparsityPattern

__all__ = ["REFINE_METHODS", "RefineResult", "reconstruction_objective", "refine_weight"]

REFINE_METHODS: tuple[str, ...] = ("none", "lsq", "swaps")
RefineMethod = Literal["lsq", "swaps"]

_CHUNK_BYTES = 256 * 2**20  # fp64 working set per row chunk (the (rows, k, k) systems of lsq)
_INFINITY = float("inf")
_REFINEMENT_STEPS = 8  # fp64-residual polishing steps of a low-precision factor before fp64 factors
_REFINED = 1e-10  # a polishing step this small (relative to the solution) ends it


@dataclass
class RefineResult:
    weight: torch.Tensor  # (out, in), the input weight's dtype and device, zeros where pruned
    mask: torch.Tensor  # bool (out, in), True = kept; same count per row (per N:M group) as before
    objective_before: float  # f of the pruner's weight, undamped H
    objective_after: float  # f of the refined weight, ≤ objective_before
    energy: float  # tr(W H Wᵀ) of the dense weight: f of pruning everything
    swaps: int  # swaps applied, over all rows
    rows_kept: int  # rows returned unchanged because their refinement would raise f

    @property
    def relative_errors(self) -> tuple[float, float]:
        """sqrt(f / tr(W H Wᵀ)) before and after refinement."""
        scale = max(self.energy, 1e-30)
        return (self.objective_before / scale) ** 0.5, (self.objective_after / scale) ** 0.5


def reconstruction_objective(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row f_r = (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ in fp64, shape (out,)."""
    delta = (dense.double() - pruned.double()).to(gram.device)
    return ((delta @ gram.double()) * delta).sum(dim=1)


def _damped(gram: torch.Tensor, percdamp: float, device: torch.device) -> torch.Tensor:
    hess = gram.detach().to(device=device, dtype=torch.float64, copy=True)
    diag = torch.diagonal(hess)
    diag[diag == 0] = 1.0  # an input that never fired: as SparseGPT, so the system stays regular
    diag += percdamp * diag.mean()
    return hess


def _row_chunk(cols: int, width: int) -> int:
    return max(1, _CHUNK_BYTES // (8 * max(cols, width * width)))


def _swap_rows(
    dense: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    hess: torch.Tensor,
    pattern: SparsityPattern,
    max_swaps: int,
    candidates: int,
) -> int:
    """1-swap search in place on a row chunk (fp64 `values`, bool `keep`); returns swaps made.

    Each step scores only the rows still improving: most rows stop after a few swaps, a few run
    to `max_swaps`."""
    cols = values.shape[1]
    hdiag = torch.diagonal(hess)
    grad = (dense - values) @ hess  # g = H d, per row (H is symmetric)
    rows = torch.arange(values.shape[0], device=values.device)  # the rows still improving
    if pattern.is_nm:
        m, pruned_per = int(pattern.m), int(pattern.n)  # type: ignore[arg-type]
        groups, kept_per = cols // m, m - pruned_per
        if not bool((keep.reshape(-1, groups, m).sum(dim=2) == kept_per).all()):
            raise ValueError(f"refinement: the mask is not exactly {pattern} in every group")
        offsets = (torch.arange(groups, device=values.device) * m).view(1, groups, 1)
    made = 0
    for _ in range(max_swaps):
        if rows.numel() == 0:
            break
        v, g, kept = values[rows], grad[rows], keep[rows]
        count = rows.numel()
        if pattern.is_nm:
            # only the kept × pruned pairs of each group, in column order (so ties resolve as a
            # search over all m × m pairs would): (rows, groups, kept_per) and (…, pruned_per)
            order = torch.sort((~kept).reshape(count, groups, m).to(torch.int8), dim=2, stable=True).indices
            kept_i = (order[..., :kept_per] + offsets).reshape(count, -1)
            pruned_j = (order[..., kept_per:] + offsets).reshape(count, -1)
            v_i = v.gather(1, kept_i)
            a = 2 * v_i * g.gather(1, kept_i) + v_i.square() * hdiag[kept_i]
            cross = hess[kept_i.view(count, groups, kept_per, 1), pruned_j.view(count, groups, 1, pruned_per)]
            inside = g.gather(1, pruned_j).view(count, groups, 1, pruned_per)
            inside = inside + v_i.view(count, groups, kept_per, 1) * cross  # g_j + ŵ_i H_ij
            delta = a.view(count, groups, kept_per, 1) - inside.square() / hdiag[pruned_j].view(
                count, groups, 1, pruned_per
            )
            best, flat = delta.reshape(count, -1).min(dim=1)
            group, pair = flat // (kept_per * pruned_per), flat % (kept_per * pruned_per)
            i = kept_i.gather(1, (group * kept_per + pair // pruned_per).unsqueeze(1)).squeeze(1)
            j = pruned_j.gather(1, (group * pruned_per + pair % pruned_per).unsqueeze(1)).squeeze(1)
        else:
            prune_cost = torch.where(kept, 2 * v * g + v.square() * hdiag, _INFINITY)
            k = min(candidates, cols)
            local = torch.arange(count, device=values.device)
            kept_i = torch.topk(prune_cost, k, dim=1, largest=False).indices
            gain = torch.where(kept, -_INFINITY, g.square() / hdiag)
            pruned_j = torch.topk(gain, k, dim=1).indices
            cross = hess[kept_i.unsqueeze(2), pruned_j.unsqueeze(1)]  # (rows, k, k): H_ij
            inside = g.gather(1, pruned_j).unsqueeze(1) + v.gather(1, kept_i).unsqueeze(2) * cross
            delta = prune_cost.gather(1, kept_i).unsqueeze(2) - inside.square() / hdiag[pruned_j].unsqueeze(1)
            invalid = ~kept.gather(1, kept_i).unsqueeze(2) | kept.gather(1, pruned_j).unsqueeze(1)
            delta = delta.masked_fill(invalid, _INFINITY).reshape(count, -1)
            best, flat = delta.min(dim=1)
            i, j = kept_i[local, flat // k], pruned_j[local, flat % k]
        # a relative threshold: a "gain" at rounding level would swap back and forth
        scale = ((dense[rows] - v) * g).sum(dim=1).abs() + 1e-300
        improve = torch.isfinite(best) & (best < -1e-12 * scale)
        rows, i, j = rows[improve], i[improve], j[improve]
        if rows.numel() == 0:
            break
        old = values[rows, i]
        new = (grad[rows, j] + old * hess[i, j]) / hdiag[j]
        values[rows, i], keep[rows, i] = 0.0, False
        values[rows, j], keep[rows, j] = new, True
        grad[rows] += old.unsqueeze(1) * hess[i] - new.unsqueeze(1) * hess[j]
        made += int(rows.numel())
    return made


def _least_squares_rows(
    dense: torch.Tensor, keep: torch.Tensor, hess: torch.Tensor, hess_low: torch.Tensor | None = None
) -> torch.Tensor:
    """ŵ_S = H_SS⁻¹ (H w)_S per row of a chunk, zeros elsewhere (fp64 result).

    Rows may keep different counts (Magnitude's and SparseGPT's unstructured masks): each row's
    system is padded to the chunk's largest count with identity rows and zero right-hand sides.

    The per-row Cholesky factors are computed in ``hess_low``'s dtype (fp32: half the bytes to
    gather and about half the time of fp64 on CPUs and GPUs) and the solution is polished by
    iterative refinement whose residual is fp64: r_S = (H (w − ŵ))_S, one product with the whole
    Gram per step, since ŵ is zero off S. The damping bounds cond(H_SS) ≤ 1 + cols / percdamp,
    so each step shrinks the error by about cond · 2⁻²⁴; it stops once a step is below 1e-10 of
    the solution, far below the output's rounding. A chunk whose
    low-precision factor fails, or whose refinement stalls, is solved again with fp64 factors."""
    rows, cols = dense.shape
    counts = keep.sum(dim=1)
    width = int(counts.max())
    if width == 0:
        return torch.zeros_like(dense)
    # kept columns first (stable: in column order), then pruned ones as padding
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    real = torch.arange(width, device=dense.device).unsqueeze(0) < counts.unsqueeze(1)
    padded = not bool(real.all())

    def factor(gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
        system = gram[order.unsqueeze(2), order.unsqueeze(1)]
        if padded:
            system.masked_fill_(~(real.unsqueeze(2) & real.unsqueeze(1)), 0.0)
            system.diagonal(dim1=1, dim2=2).add_((~real).to(system.dtype))
        lower, info = torch.linalg.cholesky_ex(system)
        return lower, bool((info == 0).all())

    def kept_residual(solution: torch.Tensor) -> torch.Tensor:
        return torch.where(real, ((dense - solution) @ hess).gather(1, order), 0.0)

    def solve(lower: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        half = torch.linalg.solve_triangular(lower, rhs.to(lower.dtype).unsqueeze(2), upper=False)
        return torch.linalg.solve_triangular(lower.mT, half, upper=True).squeeze(2).double()

    out = torch.zeros_like(dense)
    if hess_low is not None and hess_low.dtype != torch.float64:
        lower, ok = factor(hess_low)
        if ok:
            kept = torch.zeros(rows, width, dtype=torch.float64, device=dense.device)
            for _ in range(_REFINEMENT_STEPS):
                step = torch.where(real, solve(lower, kept_residual(out)), 0.0)
                kept += step
                out = torch.zeros_like(dense).scatter_(1, order, kept)
                if float(step.abs().max()) <= _REFINED * float(kept.abs().max()):
                    return out
    lower, ok = factor(hess)
    if not ok:
        raise RuntimeError("refinement: a kept block of the damped Gram is not positive definite")
    solution = torch.where(real, solve(lower, kept_residual(torch.zeros_like(dense))), 0.0)
    return torch.zeros_like(dense).scatter_(1, order, solution)


def refine_weight(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    mask: torch.Tensor,
    gram: torch.Tensor,
    pattern: SparsityPattern,
    method: RefineMethod,
    *,
    max_swaps: int = 100,
    candidates: int = 16,
    percdamp: float = 0.01,
) -> RefineResult:
    """Refine one pruned linear (module docstring).

    dense: the weight before pruning (out, in), in the basis the pruner saw; pruned, mask: the
    pruner's result (zeros where ``mask`` is False); gram: that pruner's Gram of the inputs,
    (in, in). Raises ValueError on mismatched shapes or an unknown method.
    """
    if method not in ("lsq", "swaps"):
        raise ValueError(f"unknown refinement {method!r}; supported: lsq, swaps")
    if dense.dim() != 2 or dense.shape != pruned.shape or dense.shape != mask.shape:
        raise ValueError(
            f"dense, pruned and mask must share one 2-D shape, got {tuple(dense.shape)}, "
            f"{tuple(pruned.shape)}, {tuple(mask.shape)}"
        )
    rows, cols = dense.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"refinement needs the full ({cols}, {cols}) Gram, got {tuple(gram.shape)}")
    device = dense.device
    hess = _damped(gram, percdamp, device)
    hess_low = hess.float()
    exact = gram.detach().to(device=device, dtype=torch.float64)
    weight = pruned.detach().to(torch.float64, copy=True)
    keep = mask.detach().to(torch.bool, copy=True)
    totals = {"before": 0.0, "after": 0.0, "energy": 0.0}
    swaps, kept_rows = 0, 0
    chunk = _row_chunk(cols, int(keep.sum(dim=1).max()))
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        target = dense[part].double()
        # the same arithmetic before and after, so that "not worse" is exact
        before = reconstruction_objective(target, weight[part], exact)
        values, part_keep = weight[part].clone(), keep[part].clone()
        if method == "swaps":
            swaps += _swap_rows(target, values, part_keep, hess, pattern, max_swaps, candidates)
        # rounded to the output dtype first: the guarantee is about the weight returned
        values = _least_squares_rows(target, part_keep, hess, hess_low).to(pruned.dtype).double()
        after = reconstruction_objective(target, values, exact)
        worse = after > before
        kept_rows += int(worse.sum())
        values[worse], part_keep[worse] = weight[part][worse], keep[part][worse]
        weight[part], keep[part] = values, part_keep
        totals["before"] += float(before.sum())
        totals["after"] += float(torch.where(worse, before, after).sum())
        totals["energy"] += float(reconstruction_objective(target, torch.zeros_like(target), exact).sum())
    return RefineResult(
        weight=weight.to(pruned.dtype),  # zero off the mask: the pruner's rows, or the solves'
        mask=keep,
        objective_before=totals["before"],
        objective_after=totals["after"],
        energy=totals["energy"],
        swaps=swaps,
        rows_kept=kept_rows,
    )
