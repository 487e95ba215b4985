"""Sparsity pattern parsing, formatting and the exact, deterministic lowest-k selection."""

from __future__ import annotations

import pytest
import torch

from denoiserotator.method.pruners.patterns import SparsityPattern, lowest_k_mask, nm_keep_mask, parse_pattern


@pytest.mark.parametrize(
    ("text", "kind", "sparsity", "n", "m", "canonical", "slug"),
    [
        ("50%", "unstructured", 0.5, None, None, "50%", "50pct"),
        ("0.5", "unstructured", 0.5, None, None, "50%", "50pct"),
        ("50pct", "unstructured", 0.5, None, None, "50%", "50pct"),
        (" 70 % ", "unstructured", 0.7, None, None, "70%", "70pct"),
        ("0.7", "unstructured", 0.7, None, None, "70%", "70pct"),
        ("62.5%", "unstructured", 0.625, None, None, "62.5%", "62.5pct"),
        ("62.5pct", "unstructured", 0.625, None, None, "62.5%", "62.5pct"),
        (".25", "unstructured", 0.25, None, None, "25%", "25pct"),
        ("2:4", "nm", 0.5, 2, 4, "2:4", "2-4"),
        ("2-4", "nm", 0.5, 2, 4, "2:4", "2-4"),
        ("4:8", "nm", 0.5, 4, 8, "4:8", "4-8"),
        ("1:4", "nm", 0.25, 1, 4, "1:4", "1-4"),
        ("3:4", "nm", 0.75, 3, 4, "3:4", "3-4"),
    ],
)
def test_parse_and_format(text, kind, sparsity, n, m, canonical, slug):
    pattern = parse_pattern(text)
    assert pattern.kind == kind
    assert pattern.sparsity == pytest.approx(sparsity, abs=1e-15)
    assert (pattern.n, pattern.m) == (n, m)
    assert str(pattern) == canonical
    assert pattern.slug == slug
    assert "/" not in pattern.slug and ":" not in pattern.slug and "%" not in pattern.slug


@pytest.mark.parametrize(
    "text", ["50%", "70%", "62.5%", "12.34%", "99.9%", "0.1%", "2:4", "4:8", "1:4", "7:16"]
)
def test_round_trip(text):
    pattern = parse_pattern(text)
    assert parse_pattern(str(pattern)) == pattern
    assert parse_pattern(pattern.slug) == pattern
    assert str(pattern) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "0%",
        "100%",
        "150%",
        "0",
        "1",
        "1.0",
        "1.5",
        "50",
        "-0.5",
        "-50%",
        "4:4",
        "5:4",
        "0:4",
        "2:0",
        "2:4:8",
        "nan",
        "inf",
        "50%%",
        "2:4%",
        "half",
        "2 of 4",
    ],
)
def test_rejects_bad_patterns(text):
    with pytest.raises(ValueError):
        parse_pattern(text)


def test_rejects_non_string():
    with pytest.raises(ValueError):
        parse_pattern(0.5)  # type: ignore[arg-type]


def test_direct_construction_is_validated():
    assert SparsityPattern.nm(2, 4) == SparsityPattern("nm", 0.5, 2, 4)
    with pytest.raises(ValueError):
        SparsityPattern("nm", 0.4, 2, 4)
    with pytest.raises(ValueError):
        SparsityPattern("nm", 0.5)
    with pytest.raises(ValueError):
        SparsityPattern("unstructured", 1.0)
    with pytest.raises(ValueError):
        SparsityPattern("unstructured", 0.5, 2, 4)
    with pytest.raises(ValueError):
        SparsityPattern("blocky", 0.5)  # type: ignore[arg-type]


def test_lowest_k_mask_breaks_ties_by_lower_index():
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.5, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    keep = lowest_k_mask(scores, 3)
    # a "score <= 3rd smallest" rule would prune four entries of row 0 and all of row 1
    assert keep.tolist() == [
        [True, False, False, False, True, True],
        [False, False, False, True, True, True],
    ]
    assert lowest_k_mask(scores, 0).all()


def test_nm_keep_mask_groups_are_consecutive_inputs():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert nm_keep_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, False, True, True]]
    with pytest.raises(ValueError):
        nm_keep_mask(torch.ones(2, 6), 2, 4)
