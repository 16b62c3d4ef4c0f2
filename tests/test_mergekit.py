"""soupjax's per-tensor merges against mergekit 0.1.5's own merge functions, on the same tensors.

Where the conventions agree (docs/merge_conventions.md says which mergekit setting that takes), each of
``soupjax.arithmetic.merging``'s merges equals mergekit's to float32 rounding. Where they differ (TIES's
kept count and its election at a sign sum of 0, DARE's rescaling, Model Stock's zero displacements and
negative cosines), the tests show the difference, so a change on either side is noticed.

mergekit is given the float32 tensors upcast to float64 (it then computes in float64, as soupjax does),
and both results are compared after one rounding to float32.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from mergekit.sparsify import magnitude  # noqa: E402

from soupjax.arithmetic import merging  # noqa: E402

F32 = np.float32
SHAPE = (8, 16)  # 128 entries: density 0.25 keeps 32 of them under either convention


def _ingredients(k: int, seed: int = 0, scale: float = 0.05) -> tuple[np.ndarray, list[np.ndarray]]:
    """A float32 init and ``k`` float32 ingredients near it (random displacements of std ``scale``)."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE).astype(F32)
    return x0, [(x0 + scale * rng.standard_normal(SHAPE)).astype(F32) for _ in range(k)]


def _t(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(x, np.float64))


def _mergekit(method: str, x0: np.ndarray, xs: list[np.ndarray], **parameters) -> np.ndarray:
    """mergekit's merge of ``xs`` with ``x0`` as the base model, rounded to float32."""
    out = merge_tensors([_t(x0)] + [_t(x) for x in xs], method, parameters=parameters, base_index=0)
    return out.numpy().astype(F32)


def _on_displacements(method: str, x0: np.ndarray, xs: list[np.ndarray], **parameters) -> np.ndarray:
    """mergekit's ``method`` (which has no base) on the displacements x_i - x0, plus x0, in float32."""
    taus = [_t(x) - _t(x0) for x in xs]
    base = 0 if method == "slerp" else None  # slerp's base is its t = 0 end
    out = merge_tensors(taus, method, parameters=parameters, base_index=base)
    return (out + _t(x0)).numpy().astype(F32)


def _same(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal to float32 rounding: one float32 ulp of the result, or of the weights' scale near 0.

    Both are float64 results rounded once, except that mergekit's random sparsification (DARE) rounds
    the displacement to float32 on the CPU: an error of a float32 ulp of the displacement, which is
    many ulps of a result near 0 but far below one ulp of the weights.
    """
    assert ours.dtype == theirs.dtype == F32
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=2 ** -23, atol=2 ** -24 * scale)


# --------------------------------------------------------------------------------------------------
# Where the conventions agree: the same result.


@pytest.mark.parametrize("lam", [1.0, 0.3, 1 / 3])
def test_task_arithmetic_equals_mergekit(lam):
    x0, xs = _ingredients(3)
    # mergekit task_arithmetic: weight 1 each, normalize false (its default), lambda = lam.
    _same(merging.task_arithmetic(x0, xs, lam), _mergekit("task_arithmetic", x0, xs, weight=1.0, **{"lambda": lam}))


@pytest.mark.parametrize("density,lam", [(0.25, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_ties_with_whole_kept_count_equals_mergekit(density, lam):
    x0, xs = _ingredients(4, seed=1)
    assert (density * x0.size).is_integer()  # ceil and floor agree
    theirs = _mergekit("ties", x0, xs, weight=1.0, density=density, normalize=True, **{"lambda": lam})
    _same(merging.ties(x0, xs, density, lam), theirs)


class _Replay:
    """Stands in for DARE's generator: ``random`` gives 1 where the mask keeps and 0 where it drops,
    so ``dare_drop`` (which keeps where ``random() >= p``) applies exactly this mask."""

    def __init__(self, keep: np.ndarray):
        self.keep = keep

    def random(self, shape):
        assert tuple(shape) == self.keep.shape
        return self.keep.astype(np.float64)


def _mergekit_masks(seed: int, k: int, p: float) -> list[np.ndarray]:
    """The masks mergekit's ``random`` sparsification draws after ``torch.manual_seed(seed)``: one
    ``torch.bernoulli`` of the keep probability per ingredient, in order, in float32 on the CPU."""
    torch.manual_seed(seed)
    return [torch.bernoulli(torch.full(SHAPE, 1 - p, dtype=torch.float32)).numpy() > 0 for _ in range(k)]


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_with_the_same_masks_equals_mergekit(combine):
    x0, xs = _ingredients(3, seed=2)
    p, lam, seed = 0.3, 0.8, 7
    torch.manual_seed(seed)
    if combine == "linear":
        # dare_linear without mergekit's L1 rescaling: the 1/(1-p) goes into the weights.
        theirs = _mergekit("dare_linear", x0, xs, weight=1 / (1 - p), density=1 - p, rescale=False,
                           **{"lambda": lam})
    else:
        # dare_ties normalised (the disjoint mean), rescaled by 1/(1-p) through lambda: with normalize,
        # per-ingredient weights would cancel.
        theirs = _mergekit("dare_ties", x0, xs, weight=1.0, density=1 - p, rescale=False, normalize=True,
                           **{"lambda": lam / (1 - p)})
    masks = _mergekit_masks(seed, len(xs), p)
    assert 0 < sum(m.sum() for m in masks) < len(xs) * x0.size  # some dropped, some kept
    ours = merging.dare(x0, xs, p, lam, [_Replay(m) for m in masks], combine=combine)
    _same(ours, theirs)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_slerp_on_displacements_equals_mergekit(t):
    x0, (a, b) = _ingredients(2, seed=3)
    _same(merging.slerp(x0, a, b, t), _on_displacements("slerp", x0, [a, b], t=t))


def test_slerp_of_nearly_antiparallel_displacements_equals_mergekit():
    # Issue 17's case: both fall back to the linear blend where |cos| > 0.9995.
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(64).astype(F32)
    d = rng.standard_normal(64)
    a, b = (x0 + 0.01 * d).astype(F32), (x0 - 0.005 * d).astype(F32)
    _same(merging.slerp(x0, a, b, 0.3), _on_displacements("slerp", x0, [a, b], t=0.3))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_karcher_mean_of_displacements_equals_mergekit(k):
    x0, xs = _ingredients(k, seed=4)
    # Iterated to convergence on both sides (mergekit's defaults stop at a step of 1e-5 after 10 steps).
    theirs = _on_displacements("karcher", x0, xs, max_iter=200, tol=1e-13)
    _same(merging.spherical_mean(x0, xs, max_iter=200, tol=1e-13), theirs)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_model_stock_equals_mergekit(k):
    # Ingredients that share part of their displacement, so the mean cosine is positive.
    x0, xs = _ingredients(k, seed=5)
    shared = (0.05 * np.random.default_rng(6).standard_normal(SHAPE)).astype(F32)
    xs = [(x + shared).astype(F32) for x in xs]
    assert merging.model_stock_ratio([x.astype(np.float64) - x0 for x in xs]) > 0
    _same(merging.model_stock(x0, xs), _mergekit("model_stock", x0, xs))


# --------------------------------------------------------------------------------------------------
# Where they differ (docs/merge_conventions.md): the difference, shown.


def test_ties_keeps_ceil_where_mergekit_keeps_floor():
    tau = torch.from_numpy(np.arange(1.0, 11.0))  # 10 entries, distinct magnitudes
    density = 0.25  # 2.5 entries: soupjax keeps 3, mergekit 2
    assert np.count_nonzero(merging.trim_top(tau.numpy(), density)) == 3
    assert int(torch.count_nonzero(magnitude(tau, density))) == 2
    # So TIES differs: soupjax keeps the third largest displacement, mergekit does not.
    x0 = np.zeros(10, F32)
    x1 = np.arange(1, 11, dtype=F32)
    ours = merging.ties(x0, [x1], density, 1.0)
    theirs = _mergekit("ties", x0, [x1], weight=1.0, density=density, **{"lambda": 1.0})
    np.testing.assert_array_equal(np.flatnonzero(ours), [7, 8, 9])
    np.testing.assert_array_equal(np.flatnonzero(theirs), [8, 9])


def test_ties_sign_sum_of_zero_elects_zero_where_mergekit_elects_plus():
    x0 = np.zeros(3, F32)
    xs = [np.array([1.0, 2.0, -1.0], F32), np.array([-1.0, 1.0, 1.0], F32)]  # entries 0 and 2 sum to 0
    ours = merging.ties(x0, xs, 1.0, 1.0)
    theirs = _mergekit("ties", x0, xs, weight=1.0, density=1.0, **{"lambda": 1.0})
    np.testing.assert_array_equal(ours, [0.0, 1.5, 0.0])  # no sign elected: nothing kept
    np.testing.assert_array_equal(theirs, [1.0, 1.5, 1.0])  # + elected: the positive one kept


def test_dare_rescale_is_one_over_keep_not_mergekits_l1_match():
    x0, xs = _ingredients(1, seed=8)
    p, seed = 0.5, 3
    torch.manual_seed(seed)
    theirs = _mergekit("dare_linear", x0, xs, weight=1.0, density=1 - p, rescale=True)  # mergekit's default
    (mask,) = _mergekit_masks(seed, 1, p)
    ours = merging.dare(x0, xs, p, 1.0, [_Replay(mask)])
    tau = xs[0].astype(np.float64) - x0
    kept = np.where(mask, tau, 0.0)
    # soupjax: kept / (1 - p); mergekit: kept scaled so its L1 norm is tau's.
    np.testing.assert_allclose(ours - x0, kept / (1 - p), rtol=1e-5, atol=1e-6)
    l1 = np.abs(tau).sum() / np.abs(kept).sum()
    np.testing.assert_allclose(theirs - x0, kept * l1, rtol=1e-5, atol=1e-6)
    assert abs(l1 - 1 / (1 - p)) > 1e-3  # the two scales differ for a random mask


def test_model_stock_zero_displacement_and_negative_cosine_differ_from_mergekit():
    x0 = np.zeros(4, F32)
    a, b = np.array([1.0, 1.0, 0.0, 0.0], F32), np.array([1.0, 0.0, 1.0, 0.0], F32)  # cos 1/2
    # A zero displacement: soupjax leaves its pairs out (cos 1/2, t = 3 (1/2) / (1 + 2 (1/2)) = 3/4);
    # mergekit counts them as cos 0 (mean cos 1/6, t = 3 (1/6) / (1 + 2 (1/6)) = 3/8).
    xs = [a, b, x0.copy()]
    np.testing.assert_allclose(merging.model_stock(x0, xs), 0.75 * (a + b) / 3, rtol=1e-6)
    np.testing.assert_allclose(_mergekit("model_stock", x0, xs), 0.375 * (a + b) / 3, rtol=1e-6)
    # A negative mean cosine: soupjax clips t at 0 (the init); mergekit lets t go negative.
    c = np.array([-1.0, -0.5, 0.1, 0.0], F32)
    cos = float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert cos < 0
    np.testing.assert_array_equal(merging.model_stock(x0, [a, c]), x0)
    t = 2 * cos / (1 + cos)
    np.testing.assert_allclose(_mergekit("model_stock", x0, [a, c]), t * (a + c) / 2, rtol=1e-5, atol=1e-7)


def test_slerp_from_a_zero_displacement_is_linear_where_mergekit_uses_a_right_angle():
    # soupjax: a zero displacement has no direction, so slerp is the linear t * tb. mergekit leaves the
    # zero vector unnormalised, so its cosine is 0, the angle pi/2, and the result sin(t pi/2) * tb.
    x0 = np.zeros(3, F32)
    a, b = x0.copy(), np.array([0.0, 2.0, 0.0], F32)
    t = 0.25
    np.testing.assert_allclose(merging.slerp(x0, a, b, t), t * b, rtol=1e-6)
    np.testing.assert_allclose(_on_displacements("slerp", x0, [a, b], t=t), np.sin(t * np.pi / 2) * b, rtol=1e-6)
