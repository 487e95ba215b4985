"""Standard errors of the reported numbers, and when a difference is smaller than its noise.

Zero-shot accuracy on n items is a binomial proportion: lm-eval reports its standard error as
the sample standard deviation of the per-item 0/1 scores over sqrt(n) (``acc_stderr``,
``acc_norm_stderr``). The table's zero-shot average is the unweighted mean of k tasks scored on
disjoint item sets, so the tasks' errors are independent and

    se(avg) = sqrt(se_1² + ... + se_k²) / k.

Two rows evaluated on the same items are treated as independent too (``within_noise``): that
ignores the positive correlation between them, so the rule is conservative (it calls more
differences noise than a paired test would).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# A difference counts as real when it exceeds NOISE_SIGMAS combined standard errors (≈ 95%).
NOISE_SIGMAS = 2.0


def mean_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the unweighted mean of independent estimates with these standard errors.

    sqrt(Σ se_i²) / k for k estimates; None when there are none or any is missing/non-finite
    (an average over tasks is only as certain as all of its parts are known to be).
    """
    if not stderrs or any(s is None or not math.isfinite(s) for s in stderrs):
        return None
    return math.sqrt(sum(float(s) ** 2 for s in stderrs)) / len(stderrs)


def within_noise(a: float, se_a: float | None, b: float, se_b: float | None,
                 sigmas: float = NOISE_SIGMAS) -> bool | None:  # fmt: skip
    """True when |a - b| < sigmas · sqrt(se_a² + se_b²) (the difference is smaller than its noise).

    None when a value or a standard error is missing. Raises ValueError for negative errors.
    """
    values = (a, b, se_a, se_b)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    if se_a < 0 or se_b < 0:
        raise ValueError(f"standard errors must be >= 0, got {se_a}, {se_b}")
    return abs(a - b) < sigmas * math.hypot(se_a, se_b)


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n items, as lm-eval computes it:
    sqrt(p(1-p) / (n-1)) (sample standard deviation with Bessel's correction, over sqrt(n))."""
    if n < 2:
        raise ValueError("n must be at least 2")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return math.sqrt(p * (1 - p) / (n - 1))


def items_for_avg_stderr(accuracies: Sequence[float], target: float) -> int:
    """Smallest number n of items per task for which the mean of len(accuracies) tasks, each
    scored on n items, has ``mean_stderr`` <= ``target`` (fractions, e.g. 0.02 = 2 points)."""
    if target <= 0:
        raise ValueError("target must be > 0")
    k = len(accuracies)
    variance_sum = sum(p * (1 - p) for p in accuracies)
    # se(avg)² = Σ p_i(1-p_i) / ((n-1) k²) <= target²  <=>  n >= 1 + Σ p_i(1-p_i) / (k² target²)
    n = max(2, math.ceil(1 + variance_sum / (k * k * target * target) - 1e-12))
    return n
