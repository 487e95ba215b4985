"""uncertainty.py: the average's standard error, the noise rule, and the item count it implies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from denoiserotator.evaluate.uncertainty import (
    binomial_stderr,
    items_for_avg_stderr,
    mean_stderr,
    within_noise,
)


def test_mean_stderr_formula_and_simulation() -> None:
    """Claim: se(mean of k independent estimates) = sqrt(Σ se_i²)/k, checked by formula and by
    the spread of simulated means."""
    assert mean_stderr([0.03, 0.04]) == pytest.approx(0.025)  # sqrt(9 + 16) / 2 = 2.5 points
    assert mean_stderr([0.1] * 4) == pytest.approx(0.05)  # equal errors: se / sqrt(k)
    stderrs = np.array([0.02, 0.05, 0.08])
    draws = np.random.default_rng(0).normal(0.0, stderrs, size=(200_000, 3)).mean(axis=1)
    assert draws.std() == pytest.approx(mean_stderr(stderrs.tolist()), rel=0.01)
    # An average is only as known as all of its parts.
    assert mean_stderr([0.03, None]) is None and mean_stderr([]) is None and mean_stderr([math.nan]) is None


def test_within_noise_both_ways() -> None:
    """Claim: |a - b| < 2·sqrt(se_a² + se_b²) is noise; at or beyond it, not (3-4-5: bound 0.10)."""
    assert within_noise(0.60, 0.03, 0.51, 0.04) is True  # |Δ| 0.09 < 0.10
    assert within_noise(0.60, 0.03, 0.49, 0.04) is False  # |Δ| 0.11 > 0.10
    assert within_noise(0.49, 0.03, 0.60, 0.04) is False  # the sign does not matter
    assert within_noise(0.60, 0.03, 0.51, 0.04, sigmas=1.0) is False
    assert within_noise(0.6, None, 0.5, 0.04) is None
    with pytest.raises(ValueError, match=">= 0"):
        within_noise(0.6, -0.01, 0.5, 0.04)


def test_binomial_stderr_matches_lm_evals_sample_formula() -> None:
    scores = np.array([1.0] * 13 + [0.0] * 7)  # p = 0.65 on 20 items
    assert binomial_stderr(0.65, 20) == pytest.approx(scores.std(ddof=1) / math.sqrt(20))


@pytest.mark.parametrize("accuracies", [[0.5] * 5, [0.65] * 5, [0.5, 0.55, 0.6, 0.62, 0.65]])
def test_items_for_avg_stderr_is_the_smallest_that_reaches_the_target(accuracies: list[float]) -> None:
    n = items_for_avg_stderr(accuracies, 0.02)
    avg_se = lambda m: mean_stderr([binomial_stderr(p, m) for p in accuracies])  # noqa: E731
    assert avg_se(n) <= 0.02 < avg_se(n - 1)


def test_items_for_avg_stderr_demo_numbers() -> None:
    """The numbers the README quotes: five tasks at 50% need 126 items each, at 65% 115."""
    assert items_for_avg_stderr([0.5] * 5, 0.02) == 126
    assert items_for_avg_stderr([0.65] * 5, 0.02) == 115
