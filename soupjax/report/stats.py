"""Significance of accuracy differences: is a soup really better than the best ingredient?

Two models scored on the *same* test examples are paired, so the right test is McNemar's: only the
examples on which they disagree carry information about which is better. Under the null hypothesis
(equally accurate) each disagreement is a fair coin flip, so the exact two-sided binomial test on the
discordant pairs gives the p-value (no chi-squared approximation, which is poor for the handful of
disagreements two near-identical soups produce).

``accuracy_standard_error`` is the binomial standard error of one accuracy, which the report quotes so
that a reader can tell a 0.1-point gain on 10,000 examples (noise) from a real one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["McNemarResult", "mcnemar", "binomial_two_sided_p", "accuracy_standard_error"]


@dataclasses.dataclass(frozen=True)
class McNemarResult:
    """The outcome of a paired comparison of model A (the reference) with model B.

    Attributes:
      diff: accuracy of B minus accuracy of A, as a fraction (0.012 = 1.2 points better).
      p: two-sided exact McNemar p-value; 1.0 when the models never disagree.
      n: number of paired examples.
      b_only: examples B gets right and A gets wrong.
      a_only: examples A gets right and B gets wrong.
    """

    diff: float
    p: float
    n: int
    b_only: int
    a_only: int

    def as_dict(self) -> dict[str, Any]:
        """The ``{'diff', 'p', 'n'}`` record the report's ``vs_best`` entries use (plus the counts)."""
        return dataclasses.asdict(self)


def _as_correct(values: np.ndarray, which: str) -> np.ndarray:
    """Validates a per-example 0/1 vector and returns it as bool."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{which} must be a 1-D per-example vector, got shape {arr.shape}")
    # A vector of probabilities or labels passed by mistake would silently give nonsense counts.
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{which} must contain only 0/1 (or bool) per-example correctness values")
    return arr.astype(bool)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """Exact McNemar test of model B against model A on the same examples.

    Args:
      correct_a: per-example correctness (0/1 or bool) of the reference model A.
      correct_b: per-example correctness of model B, for the same examples in the same order.

    Returns:
      A ``McNemarResult``; ``diff`` is ``acc_b - acc_a``.

    Raises:
      ValueError: if the vectors differ in length, are empty, are not 1-D, or hold values other than 0/1.
    """
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"paired test needs the same examples: correct_a has {a.shape[0]} entries, "
            f"correct_b has {b.shape[0]}"
        )
    n = int(a.shape[0])
    if n == 0:
        raise ValueError("cannot compare accuracies on 0 examples")
    b_only = int(np.count_nonzero(b & ~a))
    a_only = int(np.count_nonzero(a & ~b))
    diff = (b_only - a_only) / n  # The concordant examples cancel in acc_b - acc_a.
    discordant = b_only + a_only
    if discordant == 0:
        p = 1.0
    else:
        p = binomial_two_sided_p(a_only, discordant)
    return McNemarResult(diff=float(diff), p=p, n=n, b_only=b_only, a_only=a_only)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips: the probability of a count at
    least as far from n/2 as ``k``, i.e. ``min(1, 2 * P(X <= min(k, n - k)))`` for X ~ Binomial(n, 1/2).

    The same value as ``scipy.stats.binomtest(k, n, 0.5).pvalue`` (tests/test_report.py checks it), in
    exact integer arithmetic rounded once. Written here because importing ``scipy.stats`` added about 0.5
    CPU-seconds to every cooking command's start-up (on top of TensorFlow, which imports part of scipy
    itself), for this one sum.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    tail, term = 0, 1  # sum of C(n, i) for i <= min(k, n - k); term = C(n, i)
    for i in range(min(k, n - k) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    # 2 * tail / 2**n: a ratio of integers, so the one rounding is float division's (exact to 0.5 ulp,
    # also where 2**n overflows a float).
    return min(1.0, (2 * tail) / (1 << n))


def accuracy_standard_error(acc: float, n: int) -> float:
    """Binomial standard error ``sqrt(acc * (1 - acc) / n)`` of an accuracy measured on ``n`` examples.

    Args:
      acc: accuracy as a fraction in [0, 1].
      n: number of examples (> 0).

    Returns:
      The standard error as a fraction (multiply by 100 for percentage points).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    acc = float(acc)
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {acc}")
    return math.sqrt(acc * (1.0 - acc) / n)
