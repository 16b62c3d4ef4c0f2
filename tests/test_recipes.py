"""Tests for soupjax.arithmetic.soups: arithmetic, streaming memory, and greedy/pruned on scripted evaluators."""

import inspect
import itertools
import tracemalloc
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from soupjax.arithmetic import soups


def _tree(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "dense": {
                "kernel": rng.normal(size=(3, 4)).astype(dtype),
                "bias": rng.normal(size=(4,)).astype(dtype),
            }
        },
        "batch_stats": {
            "bn": {"mean": rng.normal(size=(4,)).astype(dtype), "var": rng.uniform(1, 2, (4,)).astype(dtype)}
        },
    }


def _loader(tree):
    return lambda: tree


def _assert_tree_close(got, want, **kw):
    got_flat = jax.tree_util.tree_leaves_with_path(got)
    want_flat = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_flat] == [p for p, _ in want_flat]
    for (path, g), (_, w) in zip(got_flat, want_flat):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=str(path), **kw)


# -- averaging -------------------------------------------------------------------------------------


def test_uniform_of_identical_ingredients_is_that_ingredient():
    t = _tree(0)
    soup = soups.uniform([_loader(t)] * 5)
    _assert_tree_close(soup, t, rtol=1e-6, atol=1e-7)


def test_uniform_of_two_is_their_mean_including_batch_stats():
    a, b = _tree(0), _tree(1)
    soup = soups.uniform([_loader(a), _loader(b)])
    want = jax.tree.map(lambda x, y: (x + y) / 2, a, b)
    _assert_tree_close(soup, want, rtol=1e-6, atol=1e-7)
    # The statistics are averaged like parameters, not copied from one ingredient.
    np.testing.assert_allclose(
        soup["batch_stats"]["bn"]["var"], (a["batch_stats"]["bn"]["var"] + b["batch_stats"]["bn"]["var"]) / 2, rtol=1e-6
    )


def test_weighted_normalized_and_raw():
    a, b = _tree(0), _tree(1)
    soup = soups.weighted([_loader(a), _loader(b)], [1.0, 3.0])
    _assert_tree_close(soup, jax.tree.map(lambda x, y: (x + 3 * y) / 4, a, b), rtol=1e-6, atol=1e-6)
    raw = soups.weighted([_loader(a), _loader(b)], [0.5, -2.0], normalize=False)
    _assert_tree_close(raw, jax.tree.map(lambda x, y: 0.5 * x - 2 * y, a, b), rtol=1e-6, atol=1e-6)


def test_weighted_skips_zero_weight_ingredients():
    a = _tree(0)

    def never():
        raise AssertionError("an ingredient with weight 0 was loaded")

    _assert_tree_close(soups.weighted([_loader(a), never], [2.0, 0.0]), a, rtol=1e-6)


def test_bfloat16_leaves_come_back_as_bfloat16_averaged_in_float32():
    bf16 = ml_dtypes.bfloat16
    trees = [_tree(s, bf16) for s in range(3)]
    soup = soups.uniform([_loader(t) for t in trees])
    for leaf in jax.tree.leaves(soup):
        assert leaf.dtype == jnp.bfloat16
    want = jax.tree.map(lambda *xs: (sum(x.astype(np.float32) for x in xs) / 3).astype(bf16), *trees)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w), soup, want)


def test_mixed_dtypes_are_kept_per_leaf():
    def tree(value, counts):
        params = {"w": np.full(3, value, np.float32), "h": np.full(3, value, ml_dtypes.bfloat16)}
        return {"params": params, "batch_stats": {"n": np.array(counts, np.int32)}}

    a, b = tree(1.0, [2, 4]), tree(0.0, [4, 5])
    soup = soups.uniform([_loader(a), _loader(b)])
    assert soup["params"]["w"].dtype == jnp.float32 and soup["params"]["h"].dtype == jnp.bfloat16
    assert soup["batch_stats"]["n"].dtype == jnp.int32
    np.testing.assert_array_equal(soup["batch_stats"]["n"], [3, 4])  # 4.5 rounds (half to even) to 4


def test_running_mean_remove_is_inverse_of_add():
    a, b, c = _tree(0), _tree(1), _tree(2)
    acc = soups.RunningMean()
    acc.add(a)
    acc.add(b)
    acc.add(c, weight=2.0)
    assert acc.count == 4.0 and acc.num_trees == 3
    acc.remove(c, weight=2.0)
    acc.remove(b)
    assert acc.count == 1.0 and acc.num_trees == 1
    _assert_tree_close(acc.mean(), a, rtol=1e-6, atol=1e-6)
    # mean_with / mean_without peek without changing the state.
    _assert_tree_close(acc.mean_with(b), jax.tree.map(lambda x, y: (x + y) / 2, a, b), rtol=1e-6, atol=1e-6)
    assert acc.count == 1.0
    acc.add(b)
    _assert_tree_close(acc.mean_without(b), a, rtol=1e-6, atol=1e-6)


def test_mismatched_shapes_error_names_path_and_both_shapes():
    a = _tree(0)
    b = _tree(1)
    b["params"]["dense"]["kernel"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"params/dense/kernel.*\(4, 3\).*\(3, 4\)"):
        soups.uniform([_loader(a), _loader(b)])
    c = _tree(2)
    del c["batch_stats"]["bn"]["var"]
    with pytest.raises(ValueError, match=r"missing \['batch_stats/bn/var'\]"):
        soups.uniform([_loader(a), _loader(c)])
    with pytest.raises(ValueError, match=r"params/dense/kernel"):
        soups.interpolate(a, b, 0.5)


def test_interpolate_endpoints_are_bit_exact():
    for dtype in (np.float32, ml_dtypes.bfloat16):
        a, b = _tree(0, dtype), _tree(1, dtype)
        a["params"]["dense"]["bias"][0] = -0.0  # signed zeros survive the endpoints too
        for alpha, want in ((0.0, a), (1.0, b)):
            got = soups.interpolate(a, b, alpha)
            jax.tree.map(
                lambda g, w: np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8)),
                got,
                want,
            )
            assert all(x.dtype == dtype for x in jax.tree.leaves(got))
    a, b = _tree(0), _tree(1)
    want = jax.tree.map(lambda x, y: 0.75 * x + 0.25 * y, a, b)
    _assert_tree_close(soups.interpolate(a, b, 0.25), want, rtol=1e-6, atol=1e-6)


def test_uniform_memory_stays_flat_in_k():
    """K=16 ingredients of 4 MB each: at no point are more than a few models alive."""
    k, model_bytes = 16, 4 * 2**20
    shapes = {f"w{j}": (2**18,) for j in range(4)}  # 4 float32 leaves of 1 MB each

    def live_jax_bytes():
        return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())

    baseline = live_jax_bytes()
    peak_live = [0]

    def make_loader(i):
        def load():
            peak_live[0] = max(peak_live[0], live_jax_bytes() - baseline)
            return {"params": {n: np.full(s, float(i), np.float32) for n, s in shapes.items()}}

        return load

    loaders = [make_loader(i) for i in range(k)]
    soups.uniform(loaders[:2])  # compile outside the measurement
    peak_live[0] = 0
    tracemalloc.start()
    try:
        soup = soups.uniform(loaders)
        _, host_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak_live[0] = max(peak_live[0], live_jax_bytes() - baseline)
    np.testing.assert_allclose(soup["params"]["w0"][:4], 7.5)
    assert host_peak < 4 * model_bytes, host_peak / model_bytes
    assert peak_live[0] < 4 * model_bytes, peak_live[0] / model_bytes
    del soup

    # The measurement has teeth: holding all K at once shows up as ~K models.
    tracemalloc.start()
    try:
        everything = [load() for load in loaders]
        _, naive_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del everything
    assert naive_peak > (k - 1) * model_bytes


# -- per-tensor streaming (TensorSource) -------------------------------------------------------------


def _sources(trees):
    return [soups.TreeSource(t, name=f"t{i}") for i, t in enumerate(trees)]


def _assert_same_soup(got, want):
    """Same tree, same dtypes, values equal up to float32 rounding."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert np.asarray(g).dtype == np.asarray(w).dtype, path
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-6, atol=1e-6,
                                   err_msg=str(path))


def test_uniform_by_tensor_equals_uniform():
    trees = [_tree(s) for s in range(5)]
    _assert_same_soup(soups.uniform_by_tensor(_sources(trees)), soups.uniform([_loader(t) for t in trees]))


def test_weighted_by_tensor_equals_weighted_normalized_raw_and_zero():
    trees = [_tree(s) for s in range(3)]
    for weights, normalize in (([1.0, 3.0, 0.5], True), ([0.5, -2.0, 1.0], False), ([2.0, 0.0, 1.0], True)):
        _assert_same_soup(soups.weighted_by_tensor(_sources(trees), weights, normalize),
                          soups.weighted([_loader(t) for t in trees], weights, normalize))

    class Never:
        structure = trees[0]

        def read(self, path):
            raise AssertionError("an ingredient with weight 0 was read")

    _assert_same_soup(soups.weighted_by_tensor([_sources(trees)[0], Never()], [2.0, 0.0]), trees[0])
    with pytest.raises(ValueError, match="all weights are 0"):
        soups.weighted_by_tensor(_sources(trees[:1]), [0.0])
    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        soups.weighted_by_tensor(_sources(trees[:2]), [1.0])


def test_by_tensor_keeps_integer_and_bfloat16_dtypes():
    def tree(value, counts):
        params = {"w": np.full(3, value, np.float32), "h": np.full(3, value, ml_dtypes.bfloat16)}
        return {"params": params, "batch_stats": {"n": np.array(counts, np.int32)}, "empty": {}}

    a, b = tree(1.0, [2, 4]), tree(0.3, [4, 5])
    soup = soups.uniform_by_tensor(_sources([a, b]))
    assert soup["params"]["w"].dtype == np.float32 and soup["params"]["h"].dtype == ml_dtypes.bfloat16
    assert soup["batch_stats"]["n"].dtype == np.int32 and soup["empty"] == {}
    np.testing.assert_array_equal(soup["batch_stats"]["n"], [3, 4])  # 4.5 rounds (half to even) to 4
    _assert_same_soup(soup, soups.uniform([_loader(a), _loader(b)]))
    bf = [_tree(s, ml_dtypes.bfloat16) for s in range(3)]
    got = soups.uniform_by_tensor(_sources(bf))
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                 got, soups.uniform([_loader(t) for t in bf]))  # bf16 rounding of the same float32 mean


def test_by_tensor_mismatches_name_the_path():
    a, b = _tree(0), _tree(1)
    b["params"]["dense"]["kernel"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"ingredient 1 \(t1\).*params/dense/kernel.*\(4, 3\).*\(3, 4\)"):
        soups.uniform_by_tensor(_sources([a, b]))
    c = _tree(2)
    del c["batch_stats"]["bn"]["var"]
    with pytest.raises(ValueError, match=r"missing \['batch_stats/bn/var'\]"):
        soups.uniform_by_tensor(_sources([a, c]))

    class Liar:  # declares one shape, reads another
        name = "liar"
        structure = soups.TreeSource(a).structure

        def read(self, path):
            x = soups.TreeSource(a).read(path)
            return x.reshape(-1) if path == "params/dense/kernel" else x

    with pytest.raises(ValueError, match=r"ingredient 1 \(liar\): parameter 'params/dense/kernel' was read with shape"):
        soups.uniform_by_tensor([_sources([a])[0], Liar()])
    with pytest.raises(TypeError, match="not a TensorSource"):
        soups.uniform_by_tensor([_loader(a)])


def test_by_tensor_reads_one_tensor_at_a_time_and_holds_one_model():
    """Memory: the soup plus the prefetched tensors and one sum, never a second model, whatever K."""
    k, n, leaf = 12, 16, 2**16  # 16 leaves of 256 KiB float32: a model is 4 MiB
    trees = [{"params": {f"w{j:02d}": np.full(leaf, float(i + j), np.float32) for j in range(n)}} for i in range(k)]
    order = []

    class Recording(soups.TreeSource):
        def read(self, path):
            order.append(path)
            return super().read(path)

    sources = [Recording(t, name=str(i)) for i, t in enumerate(trees)]
    tensor = leaf * 4
    tracemalloc.start()
    try:
        soup = soups.uniform_by_tensor(sources, prefetch_bytes=3 * tensor, threads=2)
        _, host_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(soup["params"]["w02"], np.mean(np.arange(k)) + 2)
    # Tensor by tensor: every ingredient's w00 is read before any ingredient's w01.
    assert order == sorted(order)
    model = n * tensor
    assert host_peak < model + 6 * tensor, host_peak / model  # the soup and a few tensors: not 2 models


# -- greedy and pruned on scripted evaluators -------------------------------------------------------

K = 4


def _indicator(i):
    """Ingredient i: its kernel is the i-th unit vector, so any soup tells which ingredients it holds."""
    return {"params": {"kernel": np.eye(K, dtype=np.float32)[i], "bias": np.full((2,), float(i), np.float32)},
            "batch_stats": {"mean": np.full((2,), 10.0 * i, np.float32)}}


def _members(soup):
    return frozenset(int(j) for j in np.flatnonzero(np.asarray(soup["params"]["kernel"]) > 1e-6))


class ScriptedEval:
    """The held-out evaluator: a table from the set of ingredients in the soup to an accuracy.

    Records every call, so the tests can assert that it only ever sees candidate soups.
    """

    def __init__(self, table):
        self.table = {frozenset(k): v for k, v in table.items()}
        self.calls = []

    def __call__(self, soup):
        assert isinstance(soup, Mapping) and set(soup) == {"params", "batch_stats"}
        members = _members(soup)
        self.calls.append(members)
        # The candidate is exactly the mean of its members, batch_stats included.
        want = np.mean([_indicator(i)["batch_stats"]["mean"] for i in members], axis=0)
        np.testing.assert_allclose(soup["batch_stats"]["mean"], want, rtol=1e-6)
        return self.table[members]


SCORES = [0.50, 0.90, 0.70, 0.80]  # sorted best first: 1, 3, 2, 0; worst first: 0, 2, 3, 1
LOADERS = [(lambda i=i: _indicator(i)) for i in range(K)]


def _steps(result):
    return [(s["step"], s["ingredient"], s["action"], s["heldout"], s["n_ingredients"]) for s in result.progression]


def test_recipes_take_no_test_data():
    for fn in (soups.greedy, soups.pruned):
        params = inspect.signature(fn).parameters
        assert not any("test" in name for name in params), params


def test_greedy_adds_when_heldout_does_not_fall():
    ev = ScriptedEval({(1, 3): 0.92, (1, 3, 2): 0.92, (1, 3, 2, 0): 0.91})
    result = soups.greedy(LOADERS, SCORES, ev)
    assert ev.calls == [frozenset({1, 3}), frozenset({1, 2, 3}), frozenset({0, 1, 2, 3})]
    assert result.used == [1, 3, 2]
    assert result.heldout == 0.92
    np.testing.assert_allclose(result.weights, [0, 1 / 3, 1 / 3, 1 / 3])
    assert _steps(result) == [
        (0, 1, "add", 0.90, 1),
        (1, 3, "add", 0.92, 2),
        (2, 2, "add", 0.92, 3),  # equal accuracy: added (>=, the paper's rule)
        (3, 0, "skip", 0.91, 3),
    ]
    assert [s["soup_heldout"] for s in result.progression] == [0.90, 0.92, 0.92, 0.92]
    assert _members(result.variables) == {1, 2, 3}
    np.testing.assert_allclose(result.variables["params"]["bias"], [2.0, 2.0], rtol=1e-6)


def test_greedy_strict_skips_ties():
    ev = ScriptedEval({(1, 3): 0.92, (1, 3, 2): 0.92, (1, 3, 0): 0.93})
    result = soups.greedy(LOADERS, SCORES, ev, strict=True)
    assert result.used == [1, 3, 0]
    assert [s["action"] for s in result.progression] == ["add", "add", "skip", "add"]
    assert result.heldout == 0.93


def test_greedy_random_order_is_seeded():
    # An evaluator that prefers soups holding ingredient 2, so the outcome depends on the order.
    def make_eval():
        subsets = [frozenset(c) for n in range(1, K + 1) for c in itertools.combinations(range(K), n)]
        return ScriptedEval({s: 0.5 + 0.1 * (2 in s) - 0.01 * len(s) for s in subsets})

    runs = [soups.greedy(LOADERS, SCORES, make_eval(), order="random", seed=s) for s in (0, 0, 1, 2, 3)]
    assert _steps(runs[0]) == _steps(runs[1])
    orders = [tuple(s["ingredient"] for s in r.progression) for r in runs]
    assert all(sorted(o) == list(range(K)) for o in orders)
    assert len(set(orders[1:])) > 1  # different seeds, different orders
    # Without scores, the first ingredient is evaluated instead of looked up.
    ev = make_eval()
    soups.greedy(LOADERS, None, ev, order="random", seed=0)
    assert len(ev.calls) == K
    with pytest.raises(ValueError):
        soups.greedy(LOADERS, None, ev)  # sorted order needs the scores


def test_greedy_tie_order_index_or_official():
    """Tied held-out scores: ``ties="index"`` visits them in index order, ``ties="official"`` in reverse
    index order, as mlfoundations/model-soups main.py does (an ascending sort, reversed). The soups differ."""
    scores = [0.80, 0.90, 0.90, 0.90]  # 1, 2 and 3 tie for best
    # Soups holding 3 and 1 but not 2 are best; a soup with 2 in it is worse than the ingredient alone.
    subsets = [frozenset(c) for n in range(1, K + 1) for c in itertools.combinations(range(K), n)]
    table = {s: 0.95 if {1, 3} <= s and 2 not in s else (0.85 if 2 in s and len(s) > 1 else 0.90)
             for s in subsets}
    index = soups.greedy(LOADERS, scores, ScriptedEval(table))
    assert [s["ingredient"] for s in index.progression] == [1, 2, 3, 0]
    assert index.used == [1, 3, 0]
    official = soups.greedy(LOADERS, scores, ScriptedEval(table), ties="official")
    assert [s["ingredient"] for s in official.progression] == [3, 2, 1, 0]
    assert official.used == [3, 1, 0]
    # Same ingredients here, but a different first one: with strict ">" the soups differ.
    strict_table = dict(table)
    strict_table.update({frozenset({1, 2}): 0.85, frozenset({2, 3}): 0.91, frozenset({1, 2, 3}): 0.92})
    a = soups.greedy(LOADERS, scores, ScriptedEval(strict_table), strict=True)
    b = soups.greedy(LOADERS, scores, ScriptedEval(strict_table), strict=True, ties="official")
    assert a.used == [1, 3]
    assert b.used == [3, 2, 1]
    assert _members(a.variables) != _members(b.variables)
    # The default is index order, and the tie order is validated.
    assert soups.greedy(LOADERS, scores, ScriptedEval(table), ties="index").used == index.used
    with pytest.raises(ValueError, match="ties"):
        soups.greedy(LOADERS, scores, ScriptedEval(table), ties="reverse")


PRUNE_TABLE = {
    (0, 1, 2, 3): 0.80,
    (1, 2, 3): 0.82,
    (1, 3): 0.81,
    (1, 2): 0.82,
    (2,): 0.70,
    (1,): 0.83,
    (2, 3): 0.60,
}


def test_pruned_follows_the_algorithm_step_by_step():
    ev = ScriptedEval(PRUNE_TABLE)
    result = soups.pruned(LOADERS, ev, passes=3, heldout_scores=SCORES)
    assert _steps(result) == [
        (0, None, "start", 0.80, 4),
        (1, 0, "remove", 0.82, 3),  # worst first: 0, 2, 3, 1
        (2, 2, "keep", 0.81, 3),
        (3, 3, "remove", 0.82, 2),  # a tie removes (>=)
        (4, 1, "keep", 0.70, 2),
        (5, 2, "remove", 0.83, 1),  # pass 2; then 1 is the last ingredient and is never offered
    ]
    assert ev.calls == [frozenset(s) for s in [(0, 1, 2, 3), (1, 2, 3), (1, 3), (1, 2), (2,), (1,)]]
    assert result.used == [1] and result.heldout == 0.83
    assert result.weights == [0.0, 1.0, 0.0, 0.0]
    # Algebraic removal: the soup is ingredient 1 again, up to float32 rounding.
    _assert_tree_close(result.variables, _indicator(1), atol=1e-6)


def test_pruned_one_pass_and_strict():
    one = soups.pruned(LOADERS, ScriptedEval(PRUNE_TABLE), passes=1, heldout_scores=SCORES)
    assert [s["action"] for s in one.progression] == ["start", "remove", "keep", "remove", "keep"]
    assert one.used == [1, 2] and one.heldout == 0.82

    ev = ScriptedEval(PRUNE_TABLE)
    strict = soups.pruned(LOADERS, ev, passes=5, heldout_scores=SCORES, strict=True)
    # Pass 1 removes only 0; pass 2 removes nothing and ends the search (pass 3..5 would repeat it).
    assert [(s["ingredient"], s["action"]) for s in strict.progression] == [
        (None, "start"), (0, "remove"), (2, "keep"), (3, "keep"), (1, "keep"),
        (2, "keep"), (3, "keep"), (1, "keep"),
    ]
    assert strict.used == [1, 2, 3] and strict.heldout == 0.82


def test_pruned_explicit_ranking():
    ev = ScriptedEval({(0, 1, 2, 3): 0.8, (0, 1, 2): 0.7, (0, 1, 3): 0.7, (0, 2, 3): 0.7, (1, 2, 3): 0.7})
    result = soups.pruned(LOADERS, ev, ranking=[3, 2, 1, 0])
    assert [s["ingredient"] for s in result.progression] == [None, 3, 2, 1, 0]
    assert result.used == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        soups.pruned(LOADERS, ev, ranking=[0, 0, 1, 2])
