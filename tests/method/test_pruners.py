"""Pruning kernels against slow, obvious references written with Python loops, plus exact-count checks."""

from __future__ import annotations

import math

import pytest
import torch

from denoiserotator.method.pruners import (
    PRUNERS,
    PruneResult,
    SparsityPattern,
    inverse_hessian_cholesky,
    magnitude_mask,
    parse_pattern,
    prune_weight,
    sparsegpt_prune,
    wanda_mask,
)

UNSTRUCTURED = ["50%", "70%"]
NM = ["2:4", "4:8", "1:4"]
ALL_PATTERNS = UNSTRUCTURED + NM


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weight(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed), dtype=torch.float64).to(dtype)


def tied_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Only four magnitudes and no zeros, like a dequantised Q4 block: most entries tie with many others."""
    levels = torch.tensor([0.25, 0.5, 0.75, 1.0])
    idx = torch.randint(0, 4, (rows, cols), generator=_gen(seed))
    sign = torch.randint(0, 2, (rows, cols), generator=_gen(seed + 1)) * 2 - 1
    return levels[idx] * sign


def random_gram(cols: int, tokens: int = 64, seed: int = 1, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """H = X X^T of correlated inputs with unequal scales; rows of X listed in ``dead`` never fire."""
    g = _gen(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    z = torch.randn(cols, tokens, generator=g, dtype=torch.float64)
    x = (torch.eye(cols, dtype=torch.float64) + mix) @ z
    x = x * torch.linspace(0.3, 3.0, cols, dtype=torch.float64).unsqueeze(1)
    x[list(dead)] = 0
    return x @ x.T


# ---------------------------------------------------------------- slow references (plain Python loops)


def ref_lowest(scored: list[tuple[float, int]], k: int) -> set[int]:
    """Indices of the k lowest scores; ties go to the lower index."""
    return {idx for _, idx in sorted(scored)[:k]}


def ref_magnitude_keep(w: torch.Tensor, pattern: SparsityPattern) -> list[list[bool]]:
    rows, cols = w.shape
    vals = w.double().tolist()
    keep = [[True] * cols for _ in range(rows)]
    if pattern.kind == "unstructured":
        entries = [(abs(vals[r][c]), r * cols + c) for r in range(rows) for c in range(cols)]
        for flat in ref_lowest(entries, int(rows * cols * pattern.sparsity)):
            keep[flat // cols][flat % cols] = False
        return keep
    for r in range(rows):
        for g0 in range(0, cols, pattern.m):
            for c in ref_lowest([(abs(vals[r][c]), c) for c in range(g0, g0 + pattern.m)], pattern.n):
                keep[r][c] = False
    return keep


def ref_wanda_keep(w: torch.Tensor, gram: torch.Tensor, pattern: SparsityPattern) -> list[list[bool]]:
    rows, cols = w.shape
    vals = w.double().tolist()
    norms = [math.sqrt(max(float(gram[j, j]), 0.0)) for j in range(cols)]
    keep = [[True] * cols for _ in range(rows)]
    for r in range(rows):
        score = [abs(vals[r][c]) * norms[c] for c in range(cols)]
        if pattern.kind == "unstructured":
            groups = [range(cols)]
            k = int(cols * pattern.sparsity)
        else:
            groups = [range(g0, g0 + pattern.m) for g0 in range(0, cols, pattern.m)]
            k = pattern.n
        for group in groups:
            for c in ref_lowest([(score[c], c) for c in group], k):
                keep[r][c] = False
    return keep


def ref_sparsegpt(
    w: torch.Tensor, gram: torch.Tensor, pattern: SparsityPattern, blocksize: int, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SparseGPT recurrence one column at a time, in fp64, without lazy block updates."""
    rows, cols = w.shape
    H = gram.double().clone()
    W = w.double().clone()
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    lam = percdamp * float(torch.diagonal(H).mean())
    hinv = torch.linalg.cholesky(torch.linalg.inv(H + lam * torch.eye(cols, dtype=torch.float64)), upper=True)
    keep = [[True] * cols for _ in range(rows)]
    for j in range(cols):
        if pattern.kind == "unstructured" and j % blocksize == 0:
            block = range(j, min(j + blocksize, cols))
            width = len(block)
            scored = [
                (float(W[r, c]) ** 2 / float(hinv[c, c]) ** 2, r * width + (c - j))
                for r in range(rows)
                for c in block
            ]
            for flat in ref_lowest(scored, int(rows * width * pattern.sparsity)):
                keep[flat // width][j + flat % width] = False
        if pattern.kind == "nm" and j % pattern.m == 0:
            for r in range(rows):
                group = range(j, j + pattern.m)
                scored = [(float(W[r, c]) ** 2 / float(hinv[c, c]) ** 2, c) for c in group]
                for c in ref_lowest(scored, pattern.n):
                    keep[r][c] = False
        for r in range(rows):
            q = float(W[r, j]) if keep[r][j] else 0.0
            err = (float(W[r, j]) - q) / float(hinv[j, j])
            for c in range(j + 1, cols):
                W[r, c] -= err * float(hinv[j, c])
            W[r, j] = q
    return W, torch.tensor(keep)


# ---------------------------------------------------------------- magnitude


@pytest.mark.parametrize("pattern_text", ALL_PATTERNS)
@pytest.mark.parametrize("make", [random_weight, tied_weight])
def test_magnitude_matches_reference(pattern_text, make):
    pattern = parse_pattern(pattern_text)
    w = make(6, 16, seed=3)
    keep = magnitude_mask(w, pattern)
    assert keep.dtype == torch.bool
    assert keep.tolist() == ref_magnitude_keep(w, pattern)


@pytest.mark.parametrize("pattern_text", UNSTRUCTURED)
def test_magnitude_exact_count_per_matrix_with_ties(pattern_text):
    pattern = parse_pattern(pattern_text)
    w = tied_weight(7, 24, seed=5)  # 168 entries, only 4 distinct magnitudes
    result = prune_weight("magnitude", w, None, pattern)
    expected = int(w.numel() * pattern.sparsity)
    assert int((~result.mask).sum()) == expected
    assert int((result.weight == 0).sum()) == expected  # no pre-existing zeros
    again = prune_weight("magnitude", w.clone(), None, pattern)
    assert torch.equal(again.mask, result.mask) and torch.equal(again.weight, result.weight)


# ---------------------------------------------------------------- wanda


@pytest.mark.parametrize("pattern_text", ALL_PATTERNS)
@pytest.mark.parametrize("make", [random_weight, tied_weight])
def test_wanda_matches_reference(pattern_text, make):
    pattern = parse_pattern(pattern_text)
    w = make(6, 16, seed=4)
    gram = random_gram(16, seed=2)
    assert wanda_mask(w, gram, pattern).tolist() == ref_wanda_keep(w, gram, pattern)


@pytest.mark.parametrize("pattern_text", ALL_PATTERNS)
def test_wanda_takes_the_gram_diagonal_alone(pattern_text):
    """The pipeline hands Wanda only diag(H) (in,); the masks equal those from the whole H."""
    pattern = parse_pattern(pattern_text)
    w = random_weight(6, 16, seed=4)
    gram = random_gram(16, seed=2)
    assert torch.equal(wanda_mask(w, torch.diagonal(gram).clone(), pattern), wanda_mask(w, gram, pattern))
    with pytest.raises(ValueError, match=r"its diagonal \(16,\)"):
        wanda_mask(w, torch.ones(15), pattern)


def test_wanda_differs_from_magnitude_when_inputs_differ_in_scale():
    w = random_weight(8, 32, seed=6)
    gram = torch.diag(torch.linspace(0.01, 100.0, 32, dtype=torch.float64))
    pattern = parse_pattern("50%")
    wanda = wanda_mask(w, gram, pattern)
    per_row_magnitude = wanda_mask(w, torch.eye(32), pattern)
    for r in range(8):
        assert per_row_magnitude[r].tolist() == magnitude_mask(w[r : r + 1], pattern)[0].tolist()
    assert not torch.equal(wanda, per_row_magnitude)
    # columns with tiny input norm are pruned far more often
    assert (~wanda[:, :8]).float().mean() > (~wanda[:, -8:]).float().mean()


@pytest.mark.parametrize("pattern_text", UNSTRUCTURED)
def test_wanda_exact_count_per_row_with_ties(pattern_text):
    pattern = parse_pattern(pattern_text)
    w = tied_weight(5, 30, seed=7)
    gram = torch.eye(30) * 4.0  # every column has the same norm: ties everywhere
    result = prune_weight("wanda", w, gram, pattern)
    per_row = (~result.mask).sum(dim=1)
    assert per_row.tolist() == [int(30 * pattern.sparsity)] * 5
    assert torch.equal((result.weight == 0), ~result.mask)
    assert torch.equal(prune_weight("wanda", w, gram, pattern).mask, result.mask)


# ---------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("pattern_text", ALL_PATTERNS)
@pytest.mark.parametrize("blocksize", [8, 6])
def test_sparsegpt_matches_columnwise_reference_fp64(pattern_text, blocksize):
    pattern = parse_pattern(pattern_text)
    w = random_weight(6, 16, seed=8, dtype=torch.float64)
    gram = random_gram(16, seed=9)
    result = sparsegpt_prune(w, gram, pattern, blocksize=blocksize, percdamp=0.01)
    # N:M blocks are rounded down to a multiple of M, which the plain reference does not need to know about
    ref_w, ref_keep = ref_sparsegpt(w, gram, pattern, blocksize, 0.01)
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight, ref_w, rtol=0, atol=1e-10)
    assert result.damping == 0.01


@pytest.mark.parametrize("pattern_text", ["50%", "2:4"])
def test_sparsegpt_matches_reference_fp32_with_dead_inputs(pattern_text):
    pattern = parse_pattern(pattern_text)
    w = random_weight(6, 16, seed=10)
    gram = random_gram(16, seed=11, dead=(3, 12)).float()
    result = sparsegpt_prune(w, gram, pattern, blocksize=8)
    assert result.weight.dtype == torch.float32
    ref_w, ref_keep = ref_sparsegpt(w, gram, pattern, 8, 0.01)
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight, ref_w.float(), rtol=0, atol=1e-5)
    assert (result.weight[:, [3, 12]] == 0).all()


@pytest.mark.parametrize("pattern_text", UNSTRUCTURED)
def test_sparsegpt_exact_count_per_block_with_ties(pattern_text):
    pattern = parse_pattern(pattern_text)
    w = tied_weight(7, 13, seed=12)
    gram = torch.eye(13, dtype=torch.float64) * 2.0  # diagonal Gram: scores tie exactly like the weights
    result = prune_weight("sparsegpt", w, gram, pattern, blocksize=5)
    for c0, c1 in [(0, 5), (5, 10), (10, 13)]:
        assert int((~result.mask[:, c0:c1]).sum()) == int(7 * (c1 - c0) * pattern.sparsity)
    assert torch.equal(result.weight == 0, ~result.mask)
    again = prune_weight("sparsegpt", w.clone(), gram.clone(), pattern, blocksize=5)
    assert torch.equal(again.mask, result.mask) and torch.equal(again.weight, result.weight)


def test_sparsegpt_compensation_beats_plain_masking():
    rows, cols, tokens = 32, 64, 512
    g = _gen(13)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = (torch.eye(cols) + 2 * mix) @ torch.randn(cols, tokens, generator=g)  # strongly correlated inputs
    gram = x @ x.T
    for pattern_text in ["50%", "2:4"]:
        result = prune_weight("sparsegpt", w, gram, parse_pattern(pattern_text), blocksize=16)
        compensated = torch.linalg.norm((w - result.weight) @ x)
        masked_only = torch.linalg.norm((w - w * result.mask) @ x)
        assert compensated < 0.8 * masked_only, (pattern_text, float(compensated), float(masked_only))


def test_sparsegpt_damping_retry_on_indefinite_gram():
    cols = 16
    q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=_gen(14), dtype=torch.float64))
    eigen = torch.linspace(0.5, 1.5, cols, dtype=torch.float64)
    eigen[0] = -0.05  # mean(diag H) = mean(eigen) ~ 0.94: 1% damping leaves it indefinite, 10% does not
    gram = q @ torch.diag(eigen) @ q.T
    mean_diag = float(eigen.mean())
    assert -0.05 + 0.01 * mean_diag < 0 < -0.05 + 0.1 * mean_diag
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram + 0.01 * mean_diag * torch.eye(cols, dtype=torch.float64))
    w = random_weight(6, cols, seed=15, dtype=torch.float64)
    result = prune_weight("sparsegpt", w, gram, parse_pattern("50%"), blocksize=8)
    assert result.damping == pytest.approx(0.1)
    ref_w, ref_keep = ref_sparsegpt(w, gram, parse_pattern("50%"), 8, 0.1)
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight, ref_w, rtol=0, atol=1e-9)


def test_sparsegpt_singular_gram_needs_no_retry():
    gram = random_gram(16, tokens=4, seed=16)  # rank 4 of 16
    assert int(torch.linalg.matrix_rank(gram)) == 4
    result = prune_weight("sparsegpt", random_weight(6, 16), gram, parse_pattern("2:4"), blocksize=8)
    assert result.damping == 0.01
    assert torch.isfinite(result.weight).all()


def test_inverse_hessian_cholesky_rejects_hopeless_grams():
    with pytest.raises(ValueError, match="NaN"):
        inverse_hessian_cholesky(torch.full((4, 4), float("nan")))
    with pytest.raises(RuntimeError, match="damping"):
        inverse_hessian_cholesky(-torch.eye(4) * 1e6 + torch.diag(torch.tensor([4e6, 0, 0, 0])), retries=1)


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("pattern_text", NM)
def test_nm_every_group_has_exactly_n_pruned(pruner, pattern_text):
    pattern = parse_pattern(pattern_text)
    w = tied_weight(9, 32, seed=17)
    result = prune_weight(pruner, w, random_gram(32, seed=18), pattern, blocksize=12)
    pruned = (~result.mask).reshape(9, 32 // pattern.m, pattern.m).sum(-1)
    assert (pruned == pattern.n).all()
    zeros = (result.weight == 0).reshape(9, 32 // pattern.m, pattern.m).sum(-1)
    assert (zeros >= pattern.n).all()


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_result_keeps_dtype_device_and_mask_consistency(pruner, dtype):
    w = random_weight(8, 16, seed=19).to(dtype)
    result = prune_weight(pruner, w, random_gram(16, seed=20).to(dtype), parse_pattern("50%"), blocksize=8)
    assert isinstance(result, PruneResult)
    assert result.weight.dtype == dtype and result.weight.device == w.device
    assert result.weight.shape == w.shape
    assert result.mask.dtype == torch.bool and result.mask.shape == w.shape
    assert (result.weight[~result.mask] == 0).all()
    if pruner != "sparsegpt":
        assert torch.equal(result.weight[result.mask], w[result.mask])
        assert result.damping is None
    assert not w.eq(0).any()  # the input was not modified in place


def test_prune_weight_errors():
    w = random_weight(4, 8)
    with pytest.raises(ValueError, match="magnitude, wanda, sparsegpt"):
        prune_weight("obd", w, None, parse_pattern("50%"))
    with pytest.raises(ValueError, match="Gram"):
        prune_weight("wanda", w, None, parse_pattern("50%"))
    with pytest.raises(ValueError, match="divisible"):
        prune_weight("magnitude", random_weight(4, 6), None, parse_pattern("2:4"))
    with pytest.raises(ValueError, match="divisible"):
        prune_weight("sparsegpt", random_weight(4, 6), torch.eye(6), parse_pattern("2:4"))
    with pytest.raises(ValueError, match="gram"):
        prune_weight("sparsegpt", w, torch.eye(6), parse_pattern("50%"))


@pytest.mark.gpu
@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("pattern_text", ["50%", "2:4"])
def test_cuda_matches_cpu(pruner, pattern_text):
    pattern = parse_pattern(pattern_text)
    w = tied_weight(64, 256, seed=21) + 1e-3 * random_weight(64, 256, seed=22)
    gram = random_gram(256, tokens=512, seed=23).float()
    cpu = prune_weight(pruner, w, gram, pattern)
    gpu = prune_weight(pruner, w.cuda(), gram.cuda(), pattern)
    assert gpu.weight.is_cuda and gpu.mask.is_cuda
    assert torch.equal(gpu.mask.cpu(), cpu.mask)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-4, atol=1e-4)


def test_norm_folding_changes_magnitude_masks_but_not_wanda_masks():
    """Folding an RMSNorm scale γ into W (W·diag(γ), SPEC §2) is what DenoiseRotator does before
    scoring. Wanda's mask is invariant to it (the input norms absorb γ: |W_ij γ_j|·‖x_j‖ =
    |W_ij|·‖γ_j x_j‖), Magnitude's is not: a small γ_j hides column j from one per-matrix
    threshold. This is why only Magnitude changes with 0 rotation steps (README, "Magnitude
    and DenoiseRotator on SmolLM2")."""
    from denoiserotator.method.pruners import magnitude_mask, parse_pattern, wanda_mask

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator, dtype=torch.float64)
    inputs = torch.randn(256, 32, generator=generator, dtype=torch.float64)
    gamma = torch.rand(32, generator=generator, dtype=torch.float64) + 0.05
    gamma[3] = 1e-3  # a near-zero scale, as on SmolLM2's large-activation channels
    folded = weight * gamma[None, :]
    gram = inputs.T @ inputs  # Gram of the normalised inputs, before γ
    scaled_gram = (inputs * gamma).T @ (inputs * gamma)  # Gram of what the unfolded W sees
    pattern = parse_pattern("50%")

    assert torch.equal(wanda_mask(folded, gram, pattern), wanda_mask(weight, scaled_gram, pattern))
    plain, after_fold = magnitude_mask(weight, pattern), magnitude_mask(folded, pattern)
    assert not torch.equal(plain, after_fold)
    assert not after_fold[:, 3].any()  # the whole hidden column is pruned
    assert plain[:, 3].any()
