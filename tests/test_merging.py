"""Tests for soupjax.arithmetic.merging: hand-computed examples, hypothesis properties, and merge_by_tensor.

The hand examples write the expected numbers out, with the arithmetic in comments, so a sign error or
a wrong lam convention shows up as a wrong number rather than as two implementations agreeing.
Properties run derandomized (fixed examples) on small arrays, so the file stays fast and cannot flake.
"""
from __future__ import annotations

import math

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from soupjax.arithmetic import merging
from soupjax.io.trees import TreeSource

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
SQ3 = math.sqrt(3.0)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def a32(*values) -> np.ndarray:
    return np.array(values, dtype=F32)


def close(got, want, **kw) -> None:
    assert got.dtype == F32, got.dtype
    np.testing.assert_allclose(got, np.asarray(want, np.float64), **{"rtol": 1e-6, "atol": 1e-6, **kw})


# --------------------------------------------------------------------------------------------------
# Hand-computed examples.


def test_task_arithmetic_by_hand():
    x0 = a32(1, 2, 3)
    xs = [a32(2, 2, 1), a32(1, 4, 3)]
    # taus: (1, 0, -2) and (0, 2, 0); sum (1, 2, -2); x0 + 0.5 * sum = (1.5, 3, 2).
    close(merging.task_arithmetic(x0, xs, 0.5), [1.5, 3.0, 2.0])


def test_trim_top_by_hand():
    tau = a32(0.5, -3, 2, -2, 0.1, 0)
    # density 0.5 of 6 entries: keep 3, the magnitudes 3, 2, 2 (indices 1, 2, 3), signs kept.
    np.testing.assert_array_equal(merging.trim_top(tau, 0.5), a32(0, -3, 2, -2, 0, 0))
    # A tie in magnitude: keep 2 of 5 (0.4 * 5); |-2| at index 1 and |2| at index 2 beat |-2| at
    # index 3 only by coming first.
    np.testing.assert_array_equal(merging.trim_top(a32(1, -2, 2, -2, 0.5), 0.4), a32(0, -2, 2, 0, 0))
    # 0.07 * 100 is 7.000000000000001 in floating point: still 7 entries, not 8.
    assert np.count_nonzero(merging.trim_top(np.arange(1, 101, dtype=F32), 0.07)) == 7
    # ceil: 0.25 of 6 entries is 1.5, so 2 are kept; shape and dtype are kept.
    got = merging.trim_top(a32(1, 6, 2, 5, 3, 4).reshape(2, 3), 0.25)
    assert got.shape == (2, 3) and got.dtype == F32
    np.testing.assert_array_equal(got, [[0, 6, 0], [5, 0, 0]])
    np.testing.assert_array_equal(merging.trim_top(tau, 1.0), tau)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            merging.trim_top(tau, bad)


def test_elect_sign_by_hand():
    taus = [a32(1, -2, 0, 3), a32(-2, 1, 0, -3), a32(0.5, 0.5, 0, 1)]
    # sums: (-0.5, -0.5, 0, 1).
    np.testing.assert_array_equal(merging.elect_sign(taus), [-1, -1, 0, 1])
    # 1e8 + 1 - 1e8 is 0 in float32 but 1 in exact arithmetic: the sign must be +1.
    assert merging.elect_sign([a32(1e8), a32(1), a32(-1e8)])[0] == 1


def test_disjoint_mean_by_hand():
    taus = [a32(2, -1, 0, 1), a32(4, 3, 0, -1), a32(-1, 0, 5, 0)]
    sign = np.array([1, 1, -1, 0])
    # entry 0, sign +: 2 and 4 agree -> 3.  entry 1, sign +: only 3 (the 0 does not count) -> 3.
    # entry 2, sign -: nobody (0, 0, 5) -> 0.  entry 3, sign 0: no nonzero tau has sign 0 -> 0.
    np.testing.assert_allclose(merging.disjoint_mean(taus, sign), [3, 3, 0, 0])


def test_ties_by_hand():
    x0 = a32(1, 1, 1, 1)
    xs = [a32(4, 0.5, 1, 2), a32(0, 3, 1, -1), a32(3, 1, 1.5, 1)]
    # taus: (3, -0.5, 0, 1), (-1, 2, 0, -2), (2, 0, 0.5, 0); density 0.5 keeps 2 of 4:
    #   (3, 0, 0, 1), (0, 2, 0, -2) (a tie of |2|s, both kept), (2, 0, 0.5, 0).
    # sum (5, 2, 0.5, -1) -> signs (+, +, +, -); disjoint means (2.5, 2, 0.5, -2);
    # x0 + 0.5 * mean = (2.25, 2, 1.25, 0).
    close(merging.ties(x0, xs, density=0.5, lam=0.5), [2.25, 2.0, 1.25, 0.0])


def test_dare_drop_by_hand():
    tau = a32(1, 2, 3, 4, 5, 6)
    assert merging.dare_drop(tau, 0.0, np.random.default_rng(0)) is tau
    # default_rng(0).random(6) = (0.637, 0.270, 0.041, 0.017, 0.813, 0.913); with p = 0.25 an entry is
    # kept where u >= 0.25: (keep, keep, drop, drop, keep, keep), the kept ones times 1 / 0.75 = 4/3.
    got = merging.dare_drop(tau, 0.25, np.random.default_rng(0))
    assert got.dtype == F32
    np.testing.assert_allclose(got, [4 / 3, 8 / 3, 0, 0, 20 / 3, 8], rtol=1e-6)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="probability"):
            merging.dare_drop(tau, bad, np.random.default_rng(0))


def test_dare_by_hand():
    x0 = a32(1, 1, 1, 1)
    xs = [x0 + a32(2, -2, 4, 6), x0 + a32(-2, 2, 2, 4)]
    # p = 0.5. default_rng(0).random(4) = (0.637, 0.270, 0.041, 0.017): keeps entry 0 only;
    # default_rng(1).random(4) = (0.512, 0.950, 0.144, 0.949): keeps entries 0, 1, 3. Kept entries x2:
    # dropped (4, 0, 0, 0) and (-4, 4, 0, 8); sum (0, 4, 0, 8).
    def rngs():
        return [np.random.default_rng(0), np.random.default_rng(1)]
    # linear, lam 0.5: x0 + (0, 2, 0, 4).
    close(merging.dare(x0, xs, 0.5, 0.5, rngs()), [1, 3, 1, 5])
    # ties, lam 1: signs (0, +, 0, +); disjoint means (0, 4, 0, 8) (entry 0: 4 and -4 cancel, no sign).
    close(merging.dare(x0, xs, 0.5, 1.0, rngs(), combine="ties"), [1, 5, 1, 9])
    with pytest.raises(ValueError, match="combine"):
        merging.dare(x0, xs, 0.5, 1.0, rngs(), combine="mean")
    with pytest.raises(ValueError, match="generators"):
        merging.dare(x0, xs, 0.5, 1.0, rngs()[:1])


def test_statistics_rule_is_shared_by_the_recipe_and_the_api():
    """BatchNorm statistics under SLERP are the two ends' in the proportion of t (the ends exact); the other
    methods leave them to merge_by_tensor's plain mean. soupjax.api.merge and the slerp recipe both ask
    merging.statistics_rule, so they cannot disagree."""
    a, b = a32(2, 4), a32(6, 8)
    rule = merging.statistics_rule("slerp", t=0.25)
    close(rule("batch_stats/bn/mean", [a, b]), [3.0, 5.0])
    np.testing.assert_array_equal(merging.statistics_rule("slerp", t=0.0)("s", [a, b]), a)
    np.testing.assert_array_equal(merging.statistics_rule("slerp", t=1.0)("s", [a, b]), b)
    assert merging.statistics_rule("ties", density=0.5, lam=1.0) is None
    assert merging.statistics_rule("task_arithmetic", lam=1.0) is None


def test_slerp_by_hand():
    x0 = a32(1, 1)
    a, b = a32(2, 1), a32(1, 2)
    # Orthogonal unit displacements (1, 0), (0, 1): W = pi/2, sin W = 1.
    # t = 0.5: sin(pi/4) each -> x0 + (sqrt2/2, sqrt2/2).
    h = math.sqrt(2) / 2
    close(merging.slerp(x0, a, b, 0.5), [1 + h, 1 + h])
    # t = 0.25: a gets sin(3pi/8) = 0.9238795, b gets sin(pi/8) = 0.3826834 (swapping them is a bug).
    close(merging.slerp(x0, a, b, 0.25), [1.9238795, 1.3826834])
    # The endpoints are the ingredients bit for bit, even where x0 + (a - x0) is not a: here the
    # displacement 1e-20 - 3e9 rounds to -3e9 (in float64 too), and x0 + that to 0.
    x0, a, b = a32(3e9, 1), a32(1e-20, 2), a32(-1e-20, 5)
    np.testing.assert_array_equal(merging.slerp(x0, a, b, 0.0), a)
    np.testing.assert_array_equal(merging.slerp(x0, a, b, 1.0), b)
    # Antiparallel (1, 0) and (-1, 0): linear, 0.75 (1, 0) + 0.25 (-1, 0) = (0.5, 0).
    close(merging.slerp(a32(0, 0), a32(1, 0), a32(-1, 0), 0.25), [0.5, 0.0])
    # A zero displacement: linear too, 0.5 (0, 0) + 0.5 (0, 2) = (0, 1).
    close(merging.slerp(a32(0, 0), a32(0, 0), a32(0, 2), 0.5), [0.0, 1.0])


def test_slerp_of_nearly_antiparallel_displacements_is_linear():
    """Issue 17: displacements that are antiparallel up to the float32 rounding of the stored weights.

    a = x0 + 0.01 d and b = x0 - 0.005 d, rounded to float32, have displacements at sin W ~ 5e-6 from
    antiparallel: above a threshold on sin W of 1e-6, the slerp formula ran with coefficients ~0.8 / sin W
    and missed the linear blend by ~1.8e3 (|ta| is 0.08). Within |cos W| > 0.9995 (mergekit's threshold)
    slerp is the linear blend, to float32 rounding.
    """
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(64).astype(F32)
    d = rng.standard_normal(64)
    a = (x0 + 0.01 * d).astype(F32)
    b = (x0 - 0.005 * d).astype(F32)
    ta, tb = a.astype(np.float64) - x0, b.astype(np.float64) - x0
    assert abs(np.dot(ta, tb) / (np.linalg.norm(ta) * np.linalg.norm(tb))) > 0.9995
    for t in (0.3, 0.5, 0.9):
        want = x0 + (1 - t) * ta + t * tb
        close(merging.slerp(x0, a, b, t), want, rtol=2 ** -23, atol=2 ** -23 * float(np.abs(want).max()))
    # Nearly parallel, the same way: a and a displacement twice as long.
    c = (x0 + 0.02 * d).astype(F32)
    tc = c.astype(np.float64) - x0
    want = x0 + 0.7 * ta + 0.3 * tc
    close(merging.slerp(x0, a, c, 0.3), want, rtol=2 ** -23, atol=2 ** -23 * float(np.abs(want).max()))


def test_spherical_mean_by_hand():
    zero3 = a32(0, 0, 0)
    # Directions e1, e2, e3 (lengths 1, 2, 3): by symmetry the mean direction is (1, 1, 1)/sqrt3, the
    # length the mean 2: each entry 2/sqrt3 = 1.1547005.
    close(merging.spherical_mean(zero3, [a32(1, 0, 0), a32(0, 2, 0), a32(0, 0, 3)]), [2 / SQ3] * 3)
    # On a circle: e1 twice and e2 once (angles 0, 0, 90 degrees). The Karcher mean minimises the sum of
    # squared angles: angle 30 degrees, so (cos 30, sin 30) = (sqrt3/2, 1/2) at length 1. The
    # Euclidean mean (2, 1)/sqrt5 is at 26.57 degrees: the iteration has to move it.
    zero2 = a32(0, 0)
    close(merging.spherical_mean(zero2, [a32(1, 0), a32(1, 0), a32(0, 1)]), [SQ3 / 2, 0.5])
    # A zero displacement has no direction but counts in the length: (2, 0) and (0, 0) -> length 1.
    close(merging.spherical_mean(a32(1, 1), [a32(3, 1), a32(1, 1)]), [2, 1])
    # All zero: the init.
    np.testing.assert_array_equal(merging.spherical_mean(a32(1, 2), [a32(1, 2), a32(1, 2)]), a32(1, 2))


def test_model_stock_ratio_by_hand():
    # (1, 0) and (1, sqrt3) are 60 degrees apart: cos 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3.
    assert merging.model_stock_ratio([a32(1, 0), a32(1, SQ3)]) == pytest.approx(2 / 3, rel=1e-7)
    # K = 3 with one zero displacement: only the pair (0, 2) counts, cos 0.5; t = 3 * 0.5 / (1 + 2 * 0.5).
    assert merging.model_stock_ratio([a32(1, 0), a32(0, 0), a32(1, SQ3)]) == pytest.approx(0.75, rel=1e-7)
    assert merging.model_stock_ratio([a32(3, 4)]) == 1.0
    assert merging.model_stock_ratio([a32(0, 0), a32(0, 0)]) == 1.0  # no defined pair: the mean
    assert merging.model_stock_ratio([a32(1, 0), a32(0, 1)]) == 0.0  # orthogonal: cos 0
    assert merging.model_stock_ratio([a32(1, 0), a32(-1, 0.1)]) == 0.0  # cos < 0: the init


def test_model_stock_by_hand():
    x0 = a32(1, 1)
    xs = [a32(2, 1), a32(2, 1 + SQ3)]
    # taus (1, 0), (1, sqrt3): t = 2/3, mean tau (1, sqrt3/2); x0 + 2/3 (1, sqrt3/2) = (5/3, 1 + sqrt3/3).
    close(merging.model_stock(x0, xs), [5 / 3, 1 + SQ3 / 3])


def test_tensor_rng_is_per_tensor():
    # The same (seed, path, index) gives the same stream whatever was drawn before; any change differs.
    first = merging.tensor_rng(7, "params/w", 1).random(8)
    merging.tensor_rng(7, "params/other", 0).random(100)
    np.testing.assert_array_equal(merging.tensor_rng(7, "params/w", 1).random(8), first)
    for other in [(8, "params/w", 1), (7, "params/v", 1), (7, "params/w", 0)]:
        assert not np.array_equal(merging.tensor_rng(*other).random(8), first)


# --------------------------------------------------------------------------------------------------
# Properties.

_vals = st.floats(-10, 10, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
_mags = st.floats(0.0625, 10, width=32)


@st.composite
def ingredients(draw, *, min_k: int = 1):
    """(x0, xs): an init and K in [min_k, 4] ingredients, 1-D float32 arrays of 1 to 6 entries."""
    n = draw(st.integers(1, 6))
    k = draw(st.integers(min_k, 4))
    x0 = draw(hnp.arrays(F32, n, elements=_vals))
    xs = [draw(hnp.arrays(F32, n, elements=_vals)) for _ in range(k)]
    return x0, xs


def _scale(x0, xs) -> float:
    return float(max(np.max(np.abs(x)) for x in [x0, *xs]))


@SETTINGS
@given(data=st.data(), lam=st.floats(0.1, 2.0))
def test_ties_without_conflict_is_task_arithmetic_over_k(data, lam):
    n = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, 4))
    x0 = data.draw(hnp.arrays(F32, n, elements=_vals))
    sign = data.draw(hnp.arrays(F32, n, elements=st.sampled_from([-1.0, 1.0])))
    # Every displacement has each entry's sign: no conflict, nothing trimmed at density 1.
    xs = [(x0 + sign * data.draw(hnp.arrays(F32, n, elements=_mags))).astype(F32) for _ in range(k)]
    close(merging.ties(x0, xs, 1.0, lam), merging.task_arithmetic(x0, xs, lam / k), atol=1e-5)


@SETTINGS
@given(ing=ingredients(), lam=st.floats(0.1, 2.0))
def test_dare_without_drops_is_task_arithmetic_and_ties(ing, lam):
    x0, xs = ing
    rngs = [np.random.default_rng(i) for i in range(len(xs))]
    np.testing.assert_array_equal(merging.dare(x0, xs, 0.0, lam, rngs), merging.task_arithmetic(x0, xs, lam))
    np.testing.assert_array_equal(merging.dare(x0, xs, 0.0, lam, rngs, combine="ties"),
                                  merging.ties(x0, xs, 1.0, lam))


@SETTINGS
@given(tau=hnp.arrays(F32, st.integers(1, 5), elements=_vals), p=st.floats(0.05, 0.9), seed=st.integers(0, 2**16))
def test_dare_drop_is_unbiased(tau, p, seed):
    # n independent drops at once: one call on n stacked copies of tau. Each entry of one drop has mean
    # tau and variance tau^2 (1/(1-p) - 1) = tau^2 p / (1-p), so the mean of n has standard deviation
    # |tau| sqrt(p / ((1-p) n)); allow 5 of them (a false alarm about once in 10^6 per entry). Without
    # the 1/(1-p) rescaling the mean would be (1-p) tau, off by p |tau|: 40+ deviations here.
    n = 20000
    drops = merging.dare_drop(np.tile(tau, (n, 1)), p, np.random.default_rng(seed))
    std = np.abs(tau.astype(np.float64)) * math.sqrt(p / ((1 - p) * n))
    assert np.all(np.abs(drops.astype(np.float64).mean(axis=0) - tau) <= 5 * std + 1e-6 * np.abs(tau))
    # And about a fraction p of the nonzero entries is dropped (binomial, 5 deviations).
    nonzero = tau != 0
    if nonzero.any():
        dropped = (drops[:, nonzero] == 0).mean()
        assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / (n * nonzero.sum()))


@SETTINGS
@given(ing=ingredients())
def test_task_arithmetic_over_k_is_the_mean(ing):
    x0, xs = ing
    mean = np.mean(np.stack(xs).astype(np.float64), axis=0)
    close(merging.task_arithmetic(x0, xs, 1 / len(xs)), mean, atol=1e-6 * _scale(x0, xs))


@SETTINGS
@given(ing=ingredients(), k=st.integers(1, 4), t=st.floats(0.0, 1.0))
def test_every_method_of_copies_is_the_ingredient(ing, k, t):
    x0, (x, *_) = ing
    xs = [x] * k
    tol = dict(rtol=1e-6, atol=1e-6 * _scale(x0, xs))
    rngs = [merging.tensor_rng(0, "w", i) for i in range(k)]
    # lam as each convention makes a copy soup the ingredient: 1/K of the sum, 1 of the mean.
    close(merging.task_arithmetic(x0, xs, 1 / k), x, **tol)
    close(merging.ties(x0, xs, 1.0, 1.0), x, **tol)
    close(merging.dare(x0, xs, 0.0, 1 / k, rngs), x, **tol)
    close(merging.dare(x0, xs, 0.0, 1.0, rngs, combine="ties"), x, **tol)
    close(merging.slerp(x0, x, x, t), x, **tol)
    close(merging.spherical_mean(x0, xs), x, **tol)
    close(merging.model_stock(x0, xs), x, **tol)
    if np.any(x != x0):
        assert merging.model_stock_ratio([x - x0] * k) == pytest.approx(1.0)


@SETTINGS
@given(ing=ingredients(min_k=2), t=st.floats(0.0, 1.0))
def test_slerp_endpoints_are_exact(ing, t):
    x0, (a, b, *_) = ing
    np.testing.assert_array_equal(merging.slerp(x0, a, b, 0.0), a)
    np.testing.assert_array_equal(merging.slerp(x0, a, b, 1.0), b)
    # In between: finite, whatever the angle (antiparallel and zero displacements fall back to linear).
    assert np.all(np.isfinite(merging.slerp(x0, a, b, t)))


@SETTINGS
@given(x0=hnp.arrays(F32, 4, elements=_vals), ta=hnp.arrays(F32, 4, elements=_mags),
       c=st.sampled_from([-4.0, -1.0, -0.5, 0.5, 1.0, 2.0]), t=st.floats(0.0, 1.0))
def test_slerp_of_parallel_displacements_is_linear(x0, ta, c, t):
    a = (x0 + ta).astype(F32)
    b = (x0 + F32(c) * ta).astype(F32)
    d_a = a.astype(np.float64) - x0
    d_b = b.astype(np.float64) - x0
    want = x0 + (1 - t) * d_a + t * d_b
    close(merging.slerp(x0, a, b, t), want, atol=1e-5)


@SETTINGS
@given(x0=hnp.arrays(F32, 5, elements=_vals), u=hnp.arrays(F32, 5, elements=_mags),
       v=hnp.arrays(F32, 5, elements=_vals))
def test_spherical_mean_of_two_equal_norms_is_the_slerp_midpoint(x0, u, v):
    # Two displacements of one norm: ta = u, tb = v rescaled to |u|.
    x0 = x0.astype(np.float64)
    ta = u.astype(np.float64)
    vn = np.linalg.norm(v)
    # Only pairs with a well-defined angle between them (and not ones slerp takes as parallel).
    assume(vn > 0 and abs(np.dot(ta, v) / (np.linalg.norm(ta) * vn)) <= 0.999)
    tb = v / vn * np.linalg.norm(ta)
    a, b = (x0 + ta).astype(F32), (x0 + tb).astype(F32)
    x0 = x0.astype(F32)
    close(merging.spherical_mean(x0, [a, b]), merging.slerp(x0, a, b, 0.5), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(ing=ingredients(), k=st.integers(1, 4))
def test_spherical_mean_and_model_stock_of_identical(ing, k):
    x0, (x, *_) = ing
    tol = dict(rtol=1e-6, atol=1e-6 * _scale(x0, [x]))
    close(merging.spherical_mean(x0, [x] * k), x, **tol)
    close(merging.model_stock(x0, [x] * k), x, **tol)


@SETTINGS
@given(ing=ingredients(), seed=st.integers(0, 2**31))
def test_dare_is_deterministic_given_its_seed(ing, seed):
    x0, xs = ing
    xs = [x + F32(1) for x in xs]  # nonzero displacements from x0 - 1 below
    x0 = (x0 * 0 + np.min([x.min() for x in xs]) - 1).astype(F32)
    n = x0.size

    def run(s, combine):
        rngs = [merging.tensor_rng(s, "params/w", i) for i in range(len(xs))]
        return merging.dare(x0, xs, 0.5, 0.5, rngs, combine=combine)

    for combine in ("linear", "ties"):
        np.testing.assert_array_equal(run(seed, combine), run(seed, combine))
    # Another seed draws other masks: on 64 entries an equal result would mean 2^-64 luck.
    x0_big = np.tile(x0, 64 // n + 1)[:64]
    xs_big = [np.tile(x, 64 // n + 1)[:64] for x in xs]
    first = merging.dare(x0_big, xs_big, 0.5, 1.0, [merging.tensor_rng(seed, "w", i) for i in range(len(xs))])
    other = merging.dare(x0_big, xs_big, 0.5, 1.0, [merging.tensor_rng(seed + 1, "w", i) for i in range(len(xs))])
    assert not np.array_equal(first, other)


# --------------------------------------------------------------------------------------------------
# merge_by_tensor.


def _tree(seed: int, stats_offset: float = 0.0, count: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"dense": {"kernel": rng.normal(size=(3, 2)).astype(F32),
                             "bias": rng.normal(size=(2,)).astype(BF16)}},
        "batch_stats": {"bn": {"mean": (rng.normal(size=(2,)) + stats_offset).astype(F32),
                               "count": np.array([count], np.int32)}},
    }


class CountingSource(TreeSource):
    def __init__(self, tree, name="tree"):
        super().__init__(tree, name)
        self.reads = []

    def read(self, path):
        self.reads.append(path)
        return super().read(path)


class Nameless:
    """A TensorSource without a name."""

    def __init__(self, tree):
        self._src = TreeSource(tree)
        self.structure = self._src.structure

    def read(self, path):
        return self._src.read(path)


def test_merge_by_tensor_merges_params_and_averages_stats():
    init = _tree(0, stats_offset=100.0, count=99)  # init statistics must not leak into the merge
    trees = [_tree(1, count=2), _tree(2, count=5)]
    calls = []

    def combine(path, x0, xs):
        assert x0.dtype == F32 and all(x.dtype == F32 for x in xs)
        calls.append(path)
        return merging.task_arithmetic(x0, xs, 0.7)

    out = merging.merge_by_tensor(TreeSource(init, "init"), [TreeSource(t, f"m{i}") for i, t in enumerate(trees)],
                                  combine)
    assert sorted(calls) == ["params/dense/bias", "params/dense/kernel"]
    for name in ("kernel", "bias"):
        got = out["params"]["dense"][name]
        assert got.dtype == trees[0]["params"]["dense"][name].dtype
        want = merging.task_arithmetic(init["params"]["dense"][name].astype(F32),
                                       [t["params"]["dense"][name].astype(F32) for t in trees], 0.7)
        np.testing.assert_array_equal(got, want.astype(got.dtype))
    stats = out["batch_stats"]["bn"]
    assert stats["mean"].dtype == F32 and stats["count"].dtype == np.int32
    np.testing.assert_allclose(stats["mean"], (trees[0]["batch_stats"]["bn"]["mean"]
                                               + trees[1]["batch_stats"]["bn"]["mean"]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(stats["count"], [4])  # (2 + 5) / 2 = 3.5, rounded (to even) -> 4


def test_merge_by_tensor_merged_collections_and_integer_leaves():
    # With batch_stats merged too, its float leaf goes through combine but its integer leaf never does.
    calls = []

    def combine(path, x0, xs):
        calls.append(path)
        return x0  # the init's value: tells merged leaves from averaged ones

    init = _tree(0, stats_offset=100.0, count=99)
    out = merging.merge_by_tensor(TreeSource(init), [TreeSource(_tree(1)), TreeSource(_tree(2))], combine,
                                  merged_collections=("params", "batch_stats"))
    assert sorted(calls) == ["batch_stats/bn/mean", "params/dense/bias", "params/dense/kernel"]
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], init["batch_stats"]["bn"]["mean"])
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["count"], [2])


def test_merge_by_tensor_of_copies_keeps_stats_exactly():
    tree = _tree(3)
    out = merging.merge_by_tensor(TreeSource(_tree(0)), [TreeSource(tree)] * 3,
                                  lambda path, x0, xs: merging.model_stock(x0, xs))
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], tree["batch_stats"]["bn"]["mean"])
    np.testing.assert_allclose(out["params"]["dense"]["kernel"], tree["params"]["dense"]["kernel"], rtol=1e-6)


def test_merge_by_tensor_shape_mismatch_names_path_and_shapes():
    bad = _tree(2)
    bad["params"]["dense"]["kernel"] = np.zeros((2, 3), F32)
    sources = [CountingSource(_tree(1), "good"), CountingSource(bad, "bad")]
    with pytest.raises(ValueError, match=r"bad.*params/dense/kernel.*\(2, 3\).*\(3, 2\)"):
        merging.merge_by_tensor(TreeSource(_tree(0)), sources, lambda p, x0, xs: x0)
    assert all(not s.reads for s in sources)  # checked before anything was read
    # The init is checked too, and named "the init" when it has no name.
    with pytest.raises(ValueError, match=r"the init.*params/dense/kernel.*\(2, 3\).*\(3, 2\)"):
        merging.merge_by_tensor(Nameless(bad), [TreeSource(_tree(1))], lambda p, x0, xs: x0)


def test_merge_by_tensor_path_mismatch_names_path():
    extra = _tree(2)
    extra["params"]["head"] = {"kernel": np.zeros((2, 2), F32)}
    with pytest.raises(ValueError, match=r"params/head/kernel"):
        merging.merge_by_tensor(TreeSource(_tree(0)), [TreeSource(_tree(1)), TreeSource(extra)],
                                lambda p, x0, xs: x0)
    missing = _tree(0)
    del missing["batch_stats"]["bn"]["mean"]
    with pytest.raises(ValueError, match=r"the init.*batch_stats/bn/mean"):
        merging.merge_by_tensor(Nameless(missing), [TreeSource(_tree(1))], lambda p, x0, xs: x0)
    with pytest.raises(ValueError, match="ingredient 1.*batch_stats/bn/mean"):
        merging.merge_by_tensor(TreeSource(_tree(0)), [Nameless(_tree(1)), Nameless(missing)],
                                lambda p, x0, xs: x0)


def test_merge_by_tensor_reads_ahead_and_gives_the_same_merge():
    """The per-tensor engine's reads run ahead on threads; the merge does not depend on how far."""
    init, trees = _tree(0), [_tree(i) for i in (1, 2, 3)]

    def merge(**kw):
        return merging.merge_by_tensor(TreeSource(init), [TreeSource(t) for t in trees],
                                       lambda path, x0, xs: merging.ties(x0, xs, 0.5, 1.0), **kw)

    want = merge(threads=1, prefetch_bytes=1)  # one read at a time
    for kw in ({}, {"threads": 4, "prefetch_bytes": 1 << 20}):
        got = merge(**kw)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)

    class Liar(TreeSource):  # declares one shape, reads another
        def read(self, path):
            x = super().read(path)
            return x.reshape(-1) if path == "params/dense/kernel" else x

    with pytest.raises(ValueError, match=r"liar: parameter 'params/dense/kernel' was read with shape"):
        merging.merge_by_tensor(TreeSource(init), [TreeSource(trees[0]), Liar(trees[1], "liar")],
                                lambda path, x0, xs: x0)
