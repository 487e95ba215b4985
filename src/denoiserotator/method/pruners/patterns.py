"""Sparsity patterns: unstructured fractions ("50%") and N:M groups ("2:4").

N:M follows the SparseGPT/Wanda ``prune_n``/``prune_m`` convention: in every group of M consecutive input
columns of each row, N weights are pruned, so 2:4 and 4:8 are both 50% sparse.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["SparsityPattern", "parse_pattern", "lowest_k_mask", "nm_keep_mask"]

_PCT_DIGITS = 10  # enough to round-trip any percentage a person would type, few enough to hide float noise


def _format_percent(sparsity: float) -> str:
    return format(round(sparsity * 100.0, _PCT_DIGITS), ".12g")


@dataclass(frozen=True)
class SparsityPattern:
    kind: Literal["unstructured", "nm"]
    sparsity: float
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "unstructured":
            if self.n is not None or self.m is not None:
                raise ValueError("an unstructured pattern takes no n/m")
            if not (isinstance(self.sparsity, (int, float)) and 0.0 < float(self.sparsity) < 1.0):
                raise ValueError(f"sparsity must lie strictly between 0 and 1, got {self.sparsity!r}")
        elif self.kind == "nm":
            n, m = self.n, self.m
            if not isinstance(n, int) or not isinstance(m, int) or isinstance(n, bool) or isinstance(m, bool):
                raise ValueError(f"an N:M pattern needs integer n and m, got n={n!r}, m={m!r}")
            if not 1 <= n < m:
                raise ValueError(f"an N:M pattern needs 1 <= N < M, got {n}:{m}")
            if not math.isclose(self.sparsity, n / m, rel_tol=0.0, abs_tol=1e-12):
                raise ValueError(f"sparsity {self.sparsity} does not match {n}:{m} (= {n / m})")
        else:
            raise ValueError(f"unknown pattern kind {self.kind!r}; expected 'unstructured' or 'nm'")

    @classmethod
    def unstructured(cls, sparsity: float) -> SparsityPattern:
        return cls("unstructured", float(sparsity))

    @classmethod
    def nm(cls, n: int, m: int) -> SparsityPattern:
        return cls("nm", n / m, n, m)

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def slug(self) -> str:
        """Path-safe name: ``50pct``, ``62.5pct``, ``2-4``."""
        if self.kind == "nm":
            return f"{self.n}-{self.m}"
        return f"{_format_percent(self.sparsity)}pct"

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return f"{_format_percent(self.sparsity)}%"


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NM_RE = re.compile(r"^\s*(\d+)\s*[:\-]\s*(\d+)\s*$")
_PCT_RE = re.compile(rf"^\s*({_NUMBER})\s*(?:%|pct)\s*$", re.IGNORECASE)
_FRAC_RE = re.compile(rf"^\s*({_NUMBER})\s*$")


def parse_pattern(text: str | SparsityPattern) -> SparsityPattern:
    """Parse ``"50%"``, ``"0.5"``, ``"50pct"``, ``"2:4"`` or ``"2-4"``; raise ValueError on anything else."""
    if isinstance(text, SparsityPattern):
        return text
    if not isinstance(text, str):
        raise ValueError(f"sparsity pattern must be a string, got {type(text).__name__}")
    if match := _NM_RE.match(text):
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m:
            raise ValueError(f"invalid N:M pattern {text!r}: need 1 <= N < M (N weights pruned per M)")
        return SparsityPattern.nm(n, m)
    if match := _PCT_RE.match(text):
        sparsity = float(match.group(1)) / 100.0
    elif match := _FRAC_RE.match(text):
        sparsity = float(match.group(1))
        if sparsity >= 1.0:
            raise ValueError(
                f"invalid sparsity {text!r}: a bare number is a fraction in (0, 1); did you mean {text}%?"
            )
    else:
        raise ValueError(
            f"cannot parse sparsity pattern {text!r}; expected e.g. '50%', '0.5', '50pct', '2:4' or '2-4'"
        )
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"invalid sparsity {text!r}: must lie strictly between 0% and 100%")
    return SparsityPattern.unstructured(sparsity)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim pruning exactly the ``k`` lowest scores of each row.

    Ties are broken by position (the lower index is pruned first) through a stable sort, so the count is
    exact and the result is the same on every call, unlike ``scores <= kth_value`` which over-prunes on ties.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    return keep.scatter_(-1, order, False)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest scores in every group of ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible into groups of {m} for an N:M pattern")
    return lowest_k_mask(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)
