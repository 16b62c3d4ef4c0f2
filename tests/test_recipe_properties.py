"""Properties of the recipe arithmetic (soupjax.arithmetic.soups, soupjax.arithmetic.learned), checked with hypothesis.

Ingredients are drawn trees of one fixed layout with a float32, a bfloat16 and an int32 leaf, so the
kernels compile once and every property runs on all three dtypes. Values are finite, not subnormal,
and integers stay within +-2**20: recipes sum in float32, which holds every integer up to 2**24
exactly, so up to 8 of them sum without rounding (an int32 leaf beyond 2**24 would be rounded by
the float32 sum: the recipes' documented precision, not checked here).

Exactness, as asserted:
* a soup of one ingredient, or of K copies of one, whatever the weights, is that ingredient (equal
  values in its dtype): the recipes add displacements from the first ingredient, here all zero;
* order: the kernels compute x_0 + sum_i (x_i - x_0) / n with x_0 the first ingredient they see, so
  two orders may differ in their reference as well as in the order of the sum. Each is within
  (m - 1) u sum|x_i - x_0| of the exact sum of its m displacements (recursive summation, u = 2**-24)
  plus u |x_i - x_0| for each subtraction, and the division and the final addition round once more
  each; see ``_assert_within_rounding`` for the bound, taken over every possible reference. A
  bfloat16 result may then also round to the neighbouring bfloat16 (1 ulp). Integer leaves: equal.

The examples are derandomized (a fixed seed) so that CI cannot flake; run with
``--hypothesis-seed=N`` to explore others.
"""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from soupjax.io import trees
from soupjax.arithmetic import learned
from soupjax.arithmetic import soups as soup_arithmetic

BF16 = np.dtype(ml_dtypes.bfloat16)
U32 = 2.0 ** -24              # float32 unit roundoff
BF16_EPS = 2.0 ** -7          # bfloat16 spacing at 1: one ulp is at most this times the value
INT_LIMIT = 2 ** 20
LAYOUT = {"params/w": ((3, 2), np.float32), "params/h": ((4,), BF16), "batch_stats/n": ((2,), np.int32)}

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_floats = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def ingredient(draw) -> dict:
    """One variables tree of LAYOUT; the bfloat16 leaf is drawn in float32 and rounded to bfloat16."""
    leaves = {}
    for path, (shape, dtype) in LAYOUT.items():
        if dtype == np.int32:
            leaves[path] = draw(hnp.arrays(np.int32, shape, elements=st.integers(-INT_LIMIT, INT_LIMIT)))
        else:
            leaves[path] = draw(hnp.arrays(np.float32, shape, elements=_floats)).astype(dtype)
    return {"params": {"w": leaves["params/w"], "h": leaves["params/h"]},
            "batch_stats": {"n": leaves["batch_stats/n"]}}


def _loaders(trees):
    return [lambda t=t: t for t in trees]


def _leaves(tree) -> dict[str, np.ndarray]:
    return {trees.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_bits(got, want, what: str) -> None:
    g, w = _leaves(got), _leaves(want)
    assert g.keys() == w.keys()
    for path in w:
        assert g[path].dtype == w[path].dtype, f"{what}: {path} is {g[path].dtype}, stored {w[path].dtype}"
        np.testing.assert_array_equal(g[path], w[path], err_msg=f"{what}: {path}")


def _assert_within_rounding(got, want, trees, what: str, *, ops: int | None = None, n: int | None = None) -> None:
    """got and want: one soup computed two ways whose float32 sums differ only in rounding.

    ``trees`` are the ingredients whose values went through either sum, ``ops`` the additions and
    removals of the longer one (default len(trees)) and ``n`` the ingredients in the soup (default
    len(trees)). Each way computes x_0 + sum(x_i - x_0) / n, its reference x_0 one of ``trees``. With
    D = max over references r of sum_i |x_i - r|, the terms of a sum add up to at most 2 D in
    absolute value (a removed ingredient, pruned's, is added and subtracted), and recursive summation
    with the subtractions that make its terms is off by at most ops u (2 D); dividing by n and adding
    x_0 round once each (at most u |result| together, to first order, beside the first). So the two
    ways differ by at most 2 (2 ops u D / n + 2 u |result|), and a bfloat16 result may also round to
    its neighbour. Integer leaves sum exactly (see the module docstring) and must be equal.
    """
    ops, n = ops or len(trees), n or len(trees)
    got_leaves = _leaves(got)
    for path, w in _leaves(want).items():
        g = got_leaves[path]
        assert g.dtype == w.dtype, f"{what}: {path} is {g.dtype}, expected {w.dtype}"
        if w.dtype == np.int32:
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: {path}")
            continue
        values = np.stack([_leaves(t)[path].astype(np.float64) for t in trees])
        spread = np.max([np.abs(values - r).sum(axis=0) for r in values], axis=0)  # D, per element
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        biggest = np.maximum(np.abs(g64), np.abs(w64))
        bound = 4 * ops * U32 * spread / n + 4 * U32 * biggest
        if w.dtype == BF16:
            bound = bound + BF16_EPS * biggest
        error = np.abs(g64 - w64)
        assert np.all(error <= bound), f"{what}: {path} differs by {error.max()} (bound {bound.max()})"


# -- the uniform soup --------------------------------------------------------------------------------


@SETTINGS
@given(trees=st.lists(ingredient(), min_size=1, max_size=5), data=st.data())
def test_uniform_soup_does_not_depend_on_the_order_of_the_ingredients(trees, data):
    order = data.draw(st.permutations(range(len(trees))))
    shuffled = [trees[i] for i in order]
    soup = soup_arithmetic.uniform(_loaders(trees))
    _assert_within_rounding(soup_arithmetic.uniform(_loaders(shuffled)), soup, trees, "uniform, shuffled")
    by_tensor = soup_arithmetic.uniform_by_tensor([soup_arithmetic.TreeSource(t) for t in shuffled], threads=1)
    _assert_within_rounding(by_tensor, soup, trees, "uniform_by_tensor, shuffled")
    # In the same order both add the same displacements from the same reference, but numpy rounds
    # each operation and XLA may fuse them: equal within rounding, not necessarily bit for bit.
    _assert_within_rounding(soup_arithmetic.uniform_by_tensor([soup_arithmetic.TreeSource(t) for t in trees], threads=1), soup,
                            trees, "uniform_by_tensor vs uniform")


@SETTINGS
@given(tree=ingredient(), weight=st.floats(1e-3, 1e3))
def test_a_soup_of_one_ingredient_is_that_ingredient(tree, weight):
    _assert_same_bits(soup_arithmetic.uniform(_loaders([tree])), tree, "uniform")
    _assert_same_bits(soup_arithmetic.uniform_by_tensor([soup_arithmetic.TreeSource(tree)]), tree, "uniform_by_tensor")
    _assert_same_bits(soup_arithmetic.weighted(_loaders([tree]), [weight]), tree, "weighted")
    _assert_same_bits(soup_arithmetic.weighted_by_tensor([soup_arithmetic.TreeSource(tree)], [weight]), tree, "weighted_by_tensor")
    _assert_same_bits(soup_arithmetic.greedy(_loaders([tree]), [0.5], lambda s: 0.5).variables, tree, "greedy")
    _assert_same_bits(soup_arithmetic.pruned(_loaders([tree]), lambda s: 0.5).variables, tree, "pruned")


@SETTINGS
@given(tree=ingredient(), k=st.integers(2, 8), data=st.data())
def test_a_soup_of_k_copies_of_one_ingredient_is_that_ingredient(tree, k, data):
    # Exact in every dtype: the recipes sum displacements from the first ingredient, all zero here.
    # (Summing the copies themselves put float32 leaves up to 2 ulps off at K = 7.)
    weights = data.draw(st.lists(st.floats(1e-3, 1e3), min_size=k, max_size=k))
    sources = [soup_arithmetic.TreeSource(tree)] * k
    for what, soup in (("uniform", soup_arithmetic.uniform(_loaders([tree] * k))),
                       ("uniform_by_tensor", soup_arithmetic.uniform_by_tensor(sources)),
                       ("weighted", soup_arithmetic.weighted(_loaders([tree] * k), weights)),
                       ("weighted_by_tensor", soup_arithmetic.weighted_by_tensor(sources, weights)),
                       ("greedy", soup_arithmetic.greedy(_loaders([tree] * k), [0.5] * k, lambda s: 0.5).variables)):
        _assert_same_bits(soup, tree, f"{what} of {k} copies")


# -- mixing weights ---------------------------------------------------------------------------------


@SETTINGS
@given(trees=st.lists(ingredient(), min_size=1, max_size=4), data=st.data())
def test_learned_soup_mixing_weights_sum_to_one(trees, data):
    k = len(trees)
    for mode in ("global", "layer"):
        problem = learned.MixingProblem(learned.Ingredients(_loaders(trees)), lambda v, x: x, mode)
        rows = 1 if mode == "global" else 2  # two 'params' leaves mix; batch_stats/n follows them
        logits = np.asarray(data.draw(hnp.arrays(np.float32, (rows, k), elements=st.floats(-30, 30, width=32))))
        logits = logits[0] if mode == "global" else logits
        weights = problem.weights(logits)
        for name, w in ({"all": weights} if mode == "global" else weights).items():
            assert np.all(w >= 0) and abs(float(np.sum(w, dtype=np.float64)) - 1.0) <= k * 2 * U32, (mode, name, w)
        # Every leaf's weights, the statistics' included, are a convex combination.
        alphas = np.asarray(problem.alphas(logits), np.float64)
        assert alphas.shape == (3, k) and np.all(alphas >= 0)
        np.testing.assert_allclose(alphas.sum(axis=1), 1.0, atol=4 * k * U32)
    # Starting weights given by the user come back normalised.
    given_weights = data.draw(st.lists(st.floats(0.01, 100), min_size=k, max_size=k))
    problem = learned.MixingProblem(learned.Ingredients(_loaders(trees)), lambda v, x: x, "global")
    np.testing.assert_allclose(problem.weights(problem.init_logits(given_weights)),
                               np.asarray(given_weights) / sum(given_weights), rtol=1e-5)


@SETTINGS
@given(trees=st.lists(ingredient(), min_size=1, max_size=5), data=st.data())
def test_greedy_and_pruned_weights_sum_to_one_and_describe_the_soup(trees, data):
    k = len(trees)
    scores = data.draw(st.lists(st.sampled_from([0.5, 0.6, 0.7]), min_size=k, max_size=k))
    # Held-out accuracies of the candidates, drawn from few values so that ties (which >= keeps) occur.
    evaluate = lambda soup: data.draw(st.sampled_from([0.5, 0.6, 0.7]))
    results = {"greedy": soup_arithmetic.greedy(_loaders(trees), scores, evaluate),
               "pruned": soup_arithmetic.pruned(_loaders(trees), evaluate, passes=2, heldout_scores=scores)}
    for what, result in results.items():
        w = np.asarray(result.weights, np.float64)
        assert len(w) == k and np.all(w >= 0) and abs(w.sum() - 1.0) <= 1e-12, (what, w)
        used = sorted(result.used)
        assert [i for i in range(k) if w[i] > 0] == used and len(set(w[used])) == 1
        # The recorded weights are the soup: the uniform soup of the ingredients they select. Greedy
        # adds only those (in its visiting order); pruned adds all K and subtracts the removed ones,
        # so its rounding is that of K + removed terms of every ingredient.
        chosen = soup_arithmetic.uniform(_loaders([trees[i] for i in used]))
        if what == "greedy":
            _assert_within_rounding(result.variables, chosen, [trees[i] for i in used], what)
        else:
            _assert_within_rounding(result.variables, chosen, trees, what, ops=2 * k - len(used), n=len(used))


# -- dtypes -----------------------------------------------------------------------------------------


@SETTINGS
@given(trees=st.lists(ingredient(), min_size=2, max_size=4), data=st.data())
def test_integer_and_bfloat16_leaves_keep_their_dtype_in_every_recipe(trees, data):
    k = len(trees)
    weights = data.draw(st.lists(st.floats(0.1, 10), min_size=k, max_size=k))
    alpha = data.draw(st.floats(0, 1))
    evaluate = lambda soup: 0.5
    mix = learned.MixingProblem(learned.Ingredients(_loaders(trees)), lambda v, x: x, "layer")
    soups = {
        "uniform": soup_arithmetic.uniform(_loaders(trees)),
        "weighted": soup_arithmetic.weighted(_loaders(trees), weights),
        "weighted raw": soup_arithmetic.weighted(_loaders(trees), weights, normalize=False),
        "uniform_by_tensor": soup_arithmetic.uniform_by_tensor([soup_arithmetic.TreeSource(t) for t in trees]),
        "weighted_by_tensor": soup_arithmetic.weighted_by_tensor([soup_arithmetic.TreeSource(t) for t in trees], weights),
        "greedy": soup_arithmetic.greedy(_loaders(trees), list(range(k)), evaluate).variables,
        "pruned": soup_arithmetic.pruned(_loaders(trees), evaluate).variables,
        "interpolate": soup_arithmetic.interpolate(trees[0], trees[1], alpha),
        "learned mix": mix.mix(mix.init_logits("random", seed=1)),
    }
    stored = {p: x.dtype for p, x in _leaves(trees[0]).items()}
    for what, soup in soups.items():
        got = _leaves(soup)
        assert {p: x.dtype for p, x in got.items()} == stored, what
        # An integer leaf is a rounded mean: it stays within the ingredients' range.
        n = np.stack([_leaves(t)["batch_stats/n"] for t in trees])
        if what != "weighted raw":
            assert np.all(got["batch_stats/n"] >= n.min(0)) and np.all(got["batch_stats/n"] <= n.max(0)), what
