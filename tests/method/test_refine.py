"""Refinement after pruning: the objective never rises, the pattern stays exact, the numerics match
slow reference formulas (method/pruners/refine.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from denoiserotator.method.pruners import parse_pattern, prune_weight
from denoiserotator.method.pruners import refine as refine_module
from denoiserotator.method.pruners.refine import reconstruction_objective, refine_weight


def _problem(
    seed: int, rows: int = 24, cols: int = 32, tokens: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # correlated inputs with a few large channels, as in real layers: the Gram is far from diagonal
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    scale = torch.ones(cols)
    scale[:3] = 6.0
    x = (torch.randn(tokens, cols, generator=generator) @ mixing) * scale
    weight = torch.randn(rows, cols, generator=generator)
    return weight, x.T @ x


def _row_counts(mask: torch.Tensor, pattern: str) -> torch.Tensor:
    spec = parse_pattern(pattern)
    if spec.is_nm:
        return mask.reshape(mask.shape[0], -1, spec.m).sum(dim=2)
    return mask.sum(dim=1)


CASES = list(itertools.product(["magnitude", "wanda", "sparsegpt"], ["50%", "2:4", "4:8"], ["lsq", "swaps"]))


@pytest.mark.parametrize(("pruner", "pattern", "method"), CASES)
def test_refinement_lowers_the_objective_and_keeps_the_exact_pattern(
    pruner: str, pattern: str, method: str
) -> None:
    for seed in range(3):
        weight, gram = _problem(seed)
        pruned = prune_weight(pruner, weight, gram, parse_pattern(pattern))
        result = refine_weight(weight, pruned.weight, pruned.mask, gram, parse_pattern(pattern), method)
        before = reconstruction_objective(weight, pruned.weight, gram)
        after = reconstruction_objective(weight, result.weight, gram)
        assert torch.all(after <= before), "a row's reconstruction objective rose"
        assert float(after.sum()) < 0.999 * float(before.sum()), "refinement did not lower the objective"
        assert result.objective_after == pytest.approx(float(after.sum()), rel=1e-12)
        # exact pattern: the same count per row (per group of M) as the pruner's, zeros where pruned
        assert torch.equal(_row_counts(result.mask, pattern), _row_counts(pruned.mask, pattern))
        assert not bool(result.weight[~result.mask].any())


def test_swaps_change_the_mask_and_beat_least_squares_alone() -> None:
    weight, gram = _problem(7, rows=16, cols=48)
    spec = parse_pattern("50%")
    pruned = prune_weight("wanda", weight, gram, spec)
    lsq = refine_weight(weight, pruned.weight, pruned.mask, gram, spec, "lsq")
    swaps = refine_weight(weight, pruned.weight, pruned.mask, gram, spec, "swaps")
    assert torch.equal(lsq.mask, pruned.mask)
    assert swaps.swaps > 0 and not torch.equal(swaps.mask, pruned.mask)
    assert swaps.objective_after < lsq.objective_after


def test_least_squares_matches_a_per_row_solve() -> None:
    weight, gram = _problem(3, rows=6, cols=20)
    spec = parse_pattern("50%")
    pruned = prune_weight("magnitude", weight, gram, spec)  # rows keep different counts
    assert len(set(pruned.mask.sum(dim=1).tolist())) > 1
    percdamp = 0.01
    result = refine_weight(weight, pruned.weight, pruned.mask, gram, spec, "lsq", percdamp=percdamp)
    hess = gram.double() + percdamp * torch.diagonal(gram.double()).mean() * torch.eye(
        20, dtype=torch.float64
    )
    for row in range(6):
        kept = pruned.mask[row].nonzero().squeeze(1)
        expected = torch.zeros(20, dtype=torch.float64)
        expected[kept] = torch.linalg.solve(hess[kept][:, kept], (hess @ weight[row].double())[kept])
        torch.testing.assert_close(result.weight[row].double(), expected.to(torch.float32).double())


def test_fp32_factors_with_fp64_polishing_give_the_fp64_solution(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 Cholesky path is polished to the fp64 solve, on an ill-conditioned Gram (a tiny
    damping), and falls back to fp64 factors when the fp32 ones fail."""
    weight, gram = _problem(4, rows=40, cols=64, tokens=48)  # rank 48 < 64: singular before damping
    spec = parse_pattern("50%")
    pruned = prune_weight("magnitude", weight, gram, spec)  # uneven counts: padded systems
    hess = refine_module._damped(gram, 1e-6, weight.device)
    assert float(torch.linalg.cond(hess)) > 1e7
    factored: list[torch.dtype] = []
    cholesky = torch.linalg.cholesky_ex

    def recording(system: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factored.append(system.dtype)
        return cholesky(system)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recording)
    exact = refine_module._least_squares_rows(weight.double(), pruned.mask, hess)
    mixed = refine_module._least_squares_rows(weight.double(), pruned.mask, hess, hess.float())
    assert factored == [torch.float64, torch.float32], "the polished result must come from fp32 factors"
    torch.testing.assert_close(mixed, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
    # an fp32 Gram whose factor fails (not positive definite): the fp64 factors take over
    broken = refine_module._least_squares_rows(weight.double(), pruned.mask, hess, -hess.float())
    assert factored[2:] == [torch.float32, torch.float64]
    torch.testing.assert_close(broken, exact, rtol=1e-12, atol=0.0)


def test_a_swap_lowers_the_objective_by_exactly_its_predicted_change() -> None:
    """One swap per row, no least squares: the objective falls by the closed-form Δ."""
    weight, gram = _problem(5, rows=8, cols=16)
    spec = parse_pattern("2:4")
    pruned = prune_weight("wanda", weight, gram, spec)
    hess = refine_module._damped(gram, 0.01, weight.device)
    values, keep = pruned.weight.double().clone(), pruned.mask.clone()
    before = reconstruction_objective(weight, values, hess)
    made = refine_module._swap_rows(weight.double(), values, keep, hess, spec, 1, 16)
    after = reconstruction_objective(weight, values, hess)
    assert made > 0
    # brute force over every within-group swap with the best reinstated value
    for row in range(8):
        best = 0.0
        for i, j in itertools.product(range(16), range(16)):
            if i // 4 != j // 4 or not pruned.mask[row, i] or pruned.mask[row, j]:
                continue
            trial = pruned.weight[row].double().clone()
            trial[i] = 0.0
            d = weight[row].double() - trial
            grad_j = float(d @ hess[:, j])
            trial[j] = grad_j / float(hess[j, j])  # the minimiser along coordinate j
            change = float(reconstruction_objective(weight[row : row + 1], trial[None], hess)) - float(
                before[row]
            )
            best = min(best, change)
        assert float(after[row] - before[row]) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_a_row_that_would_get_worse_is_returned_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, gram = _problem(2)
    spec = parse_pattern("50%")
    pruned = prune_weight("sparsegpt", weight, gram, spec)
    # a least-squares step that returns garbage for every row: the guard must keep the input
    monkeypatch.setattr(
        refine_module, "_least_squares_rows", lambda dense, keep, hess, *low: dense * keep * 3.0
    )
    result = refine_weight(weight, pruned.weight, pruned.mask, gram, spec, "lsq")
    assert result.rows_kept == weight.shape[0]
    assert torch.equal(result.weight, pruned.weight)


def test_refinement_refuses_a_diagonal_gram() -> None:
    weight, gram = _problem(0)
    pruned = prune_weight("wanda", weight, gram, parse_pattern("50%"))
    with pytest.raises(ValueError, match="full"):
        refine_weight(weight, pruned.weight, pruned.mask, torch.diagonal(gram), parse_pattern("50%"), "lsq")
    with pytest.raises(ValueError, match="unknown refinement"):
        refine_weight(weight, pruned.weight, pruned.mask, gram, parse_pattern("50%"), "none")  # type: ignore[arg-type]


def test_swaps_refuse_a_mask_that_is_not_the_nm_pattern() -> None:
    weight, gram = _problem(1)
    spec = parse_pattern("2:4")
    pruned = prune_weight("wanda", weight, gram, spec)
    broken = pruned.mask.clone()
    broken[0, :4] = True  # one group keeps all four
    with pytest.raises(ValueError, match="not exactly 2:4"):
        refine_weight(weight, pruned.weight, broken, gram, spec, "swaps")
