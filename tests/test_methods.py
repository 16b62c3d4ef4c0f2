"""The recipe registry and every method in it, cooked by soupjax.cooking and checked against its arithmetic.

The per-tensor arithmetic has hand-computed and property tests in test_merging.py; here each method's
saved dish is recomputed independently from the saved ingredients and the init (numpy, float64), the
held-out choice is checked to be the grid's best point, and every method runs alone from the command
line. Tiny ViT ingredients (the init plus seeded noise) under ``tfds.testing.mock_data``.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import tensorflow_datasets as tfds

from soupjax.io import trees
from soupjax import methods
from soupjax.io import checkpoints
from soupjax import cooking
from soupjax.arithmetic import merging
from soupjax.arithmetic import soups as soup_arithmetic
from soupjax.cli.errors import InputError
from soupjax.config.base import load_config
from test_train import init_fingerprint, init_variables

ISSUE_METHODS = {"uniform", "greedy", "pruned", "learned", "ensemble", "greedy_ensemble", "task_arithmetic", "ties",
                 "dare", "slerp", "spherical_mean", "model_stock", "wise_ft"}
# Small grids keep the test fast; each still has more than one point, so the choice is a real one.
SMALL_GRIDS = {"task_arithmetic_scales": "0.5,1,2", "ties_densities": "0.2,1", "ties_lambdas": "1,2",
               "dare_drop_rates": "0,0.5", "dare_scales": "1,2", "slerp_ts": "0,0.5,1", "wise_ft_alphas": "0,0.5,1",
               "learned_epochs": 1, "learned_mode": "global"}
MOCK = 64


def _make_ingredients(root: Path, fingerprint: str | None = None) -> Path:
    config = load_config("configs/fashion_mnist_vit.py:testing")
    with tfds.testing.mock_data(num_examples=MOCK):
        init = init_variables(config)
        fingerprint = fingerprint or init_fingerprint(config)
    for i in range(3):
        rng = np.random.default_rng(i)
        tree = jax.tree_util.tree_map(
            lambda x: np.asarray(x) + 0.05 * rng.normal(size=np.shape(x)).astype(np.asarray(x).dtype), init)
        checkpoints.save_ingredient(root / f"ing{i}", tree, {
            "config": config.to_dict(), "init_fingerprint": fingerprint,
            "metrics": {"heldout": {"accuracy": 0.1 * (i + 1)}}})
    return root


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> Path:
    return _make_ingredients(tmp_path_factory.mktemp("methods") / "ingredients")


@pytest.fixture(scope="module")
def cooked(ingredients, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "soups"
    with tfds.testing.mock_data(num_examples=MOCK):
        results = cooking.cook("all", ingredients, out, shifts=["shift/gaussian_noise-3"], **SMALL_GRIDS)
    return results, out


def _flat(tree) -> dict[str, np.ndarray]:
    return {trees.path_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_method_imported_on_its_own_does_not_hide_the_others():
    """Importing one method's module first (as a test or a notebook may) registers that method; the
    registry still finds every other one. Checked in a fresh process, where nothing was imported yet."""
    import subprocess
    import sys
    code = ("from soupjax.methods.greedy_ensemble import select\n"
            "from soupjax import methods\n"
            "print(','.join(methods.names()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ISSUE_METHODS <= set(run.stdout.strip().split(","))


def test_the_registry_holds_every_method_with_its_docs_and_options():
    registered = {m.name: m for m in methods.methods()}
    assert ISSUE_METHODS <= set(registered)
    seen: set[str] = set()
    for m in registered.values():
        assert m.kind in methods.KINDS and m.summary and len(m.doc) > 80, m.name
        assert not set(m.options) & seen, m.name  # an option belongs to one method
        seen |= set(m.options)
        assert set(m.uses) <= set(methods.all_options()), m.name
    defaults = methods.resolve({})  # every default is inside its own range
    assert set(defaults) == set(methods.all_options())
    assert [m.name for m in methods.wanted("all")] == [m.name for m in methods.methods() if m.in_all]
    with pytest.raises(InputError, match="--recipe='soup_of_the_day': must be one of uniform"):
        methods.get("soup_of_the_day")


@pytest.mark.parametrize("option, value, said", [
    ("ties_densities", "0.5,0", "--ties_densities=0.5,0: must be comma-separated numbers, each in (0, 1]"),
    ("dare_drop_rates", "1", "--dare_drop_rates=1: must be comma-separated numbers, each in [0, 0.99]"),
    ("slerp_ts", "x", "--slerp_ts='x': must be"),
    ("task_arithmetic_scales", "", "--task_arithmetic_scales=: must be comma-separated positive numbers"),
    ("wise_ft_alphas", "1.5", "in [0, 1]"),
    ("pruned_passes", 0, "--pruned_passes=0: must be an integer >= 1"),
])
def test_method_options_out_of_range_are_refused_by_name(option, value, said):
    with pytest.raises(InputError) as err:
        cooking.check_recipe_options(**{option: value})
    assert said in str(err.value)


def test_greedy_ensemble_keeps_what_does_not_lower_heldout_accuracy():
    from soupjax.methods.greedy_ensemble import select
    labels = np.array([0, 1, 1])
    # Ingredient 0 gets examples 0 and 1 right (2/3). Adding 1 (right only on example 2, confidently
    # wrong on 0) lowers the ensemble to 1/3: skipped. Adding 2 (right on 1 and 2) makes 3/3: kept.
    logits = [np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
              np.array([[0.0, 9.0], [9.0, 0.0], [0.0, 3.0]]),
              np.array([[0.0, 0.5], [0.0, 1.0], [0.0, 2.0]])]
    kept, steps = select(logits, labels, [0, 1, 2])
    assert kept == [0, 2]
    assert [s["action"] for s in steps] == ["add", "skip", "add"]
    assert [round(s["heldout"], 4) for s in steps] == [0.6667, 0.3333, 1.0]
    # Equal accuracy is kept by default and skipped when strict.
    same = [logits[0], logits[0]]
    assert select(same, labels, [0, 1])[0] == [0, 1]
    assert select(same, labels, [0, 1], strict=True)[0] == [0]


@pytest.mark.slow
def test_every_method_cooks_and_each_dish_is_its_arithmetic(cooked, ingredients):
    results, out = cooked
    rows = {row["name"]: row for row in results["soups"]}
    dish_names = {d for m in methods.wanted("all") for d in m.dishes(methods.resolve(SMALL_GRIDS))}
    assert dish_names <= set(rows), sorted(dish_names - set(rows))
    names = ["ing0", "ing1", "ing2"]
    loaded = [_flat(checkpoints.load_variables(ingredients / n)) for n in names]
    config = load_config("configs/fashion_mnist_vit.py:testing")
    with tfds.testing.mock_data(num_examples=MOCK):
        theta0 = _flat(init_variables(config))
    paths = list(theta0)
    k = len(loaded)

    def saved(name):
        return _flat(checkpoints.load_variables(out / name))

    def check(name, expect):
        got = saved(name)
        for p in paths:
            np.testing.assert_allclose(got[p], expect(p), rtol=2e-6, atol=2e-6, err_msg=f"{name} {p}")

    # Every grid's choice is its best held-out point (the first of equals), and each point was one
    # held-out evaluation.
    for name, grid in results["grids"].items():
        best = max(range(len(grid)), key=lambda i: (grid[i]["heldout"], -i))
        assert rows[name]["chosen"] == grid[best]["options"], name
        assert rows[name]["heldout_evals"] == len(grid), name
    chosen = {name: rows[name].get("chosen") for name in rows}
    taus = lambda p: [x[p] - theta0[p] for x in loaded]  # noqa: E731

    lam = chosen["task_arithmetic"]["lambda"]
    assert chosen["task_arithmetic"]["scale"] == pytest.approx(lam * k)
    check("task_arithmetic", lambda p: theta0[p] + lam * sum(taus(p)))

    def ties_by_hand(p, density, lam, drop=None):
        ts = taus(p) if drop is None else drop(p)
        if density < 1:
            ts = [np.where(np.abs(t) >= np.sort(np.abs(t).ravel())[::-1][int(np.ceil(density * t.size)) - 1], t, 0)
                  for t in ts]
        sign = np.sign(sum(ts))
        agree = [(np.sign(t) == sign) & (t != 0) for t in ts]
        count = sum(a.astype(float) for a in agree)
        total = sum(np.where(a, t, 0.0) for a, t in zip(agree, ts))
        return theta0[p] + lam * np.where(count > 0, total / np.maximum(count, 1), 0.0)

    c = chosen["ties"]
    check("ties", lambda p: ties_by_hand(p, c["density"], c["lambda"]))

    def dropped(p, rate):
        return [t if rate == 0 else t * _independent_mask(0, p, i, t.shape, rate) / (1 - rate)
                for i, t in enumerate(taus(p))]

    c = chosen["dare_linear"]
    check("dare_linear", lambda p: theta0[p] + c["lambda"] * sum(dropped(p, c["p"])))
    c = chosen["dare_ties"]
    check("dare_ties", lambda p: ties_by_hand(p, 1.0, c["lambda"], drop=lambda q: dropped(q, c["p"])))

    # SLERP between the two best ingredients by held-out accuracy (as evaluated when cooking).
    heldout = [next(r["heldout"] for r in results["ingredients"] if r["name"] == n) for n in names]
    first, second = sorted(range(k), key=lambda i: -heldout[i])[:2]
    assert checkpoints.load_meta(out / "slerp")["pair"] == [names[first], names[second]]
    t = chosen["slerp"]["t"]

    def slerp_by_hand(p):
        a, b = loaded[first][p] - theta0[p], loaded[second][p] - theta0[p]
        omega = np.arccos(np.clip(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))
        return theta0[p] + (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    check("slerp", slerp_by_hand)

    def model_stock_by_hand(p):
        ts = [t.ravel() for t in taus(p)]
        cos = np.mean([ts[i] @ ts[j] / np.linalg.norm(ts[i]) / np.linalg.norm(ts[j])
                       for i in range(k) for j in range(i + 1, k)])
        ratio = k * cos / (1 + (k - 1) * cos) if cos > 0 else 0.0
        return theta0[p] + ratio * np.mean(taus(p), axis=0)
    check("model_stock", model_stock_by_hand)

    # The spherical mean keeps the mean length and lies in the span of the displacements, at equal
    # angles from displacements of equal length (noise of one scale: nearly equal here).
    sph = saved("spherical_mean")
    for p in paths:
        d = (sph[p] - theta0[p]).ravel()
        if not np.any(d):
            continue
        lengths = [np.linalg.norm(t) for t in taus(p)]
        assert np.linalg.norm(d) == pytest.approx(np.mean(lengths), rel=1e-5), p

    # WiSE-FT: the chosen point of the line between the init and its base.
    for base in ("best_ingredient", "uniform"):
        name = f"wise_ft_{base}"
        alpha = chosen[name]["alpha"]
        curve = results["wise_ft"][name]
        assert curve["alphas"] == [0.0, 0.5, 1.0] and curve["chosen_alpha"] == alpha
        assert alpha == curve["alphas"][int(np.argmax(curve["heldout"]))]
        end = loaded[first] if base == "best_ingredient" else saved("uniform")
        check(name, lambda p: theta0[p] + alpha * (end[p] - theta0[p]))

    # The greedy ensemble is an ensemble of the ingredients it kept; its held-out steps are in the report.
    row = rows["greedy_ensemble"]
    assert row["kind"] == "ensemble" and row["forward_passes"] == row["n_ingredients"] == sum(
        w > 0 for w in row["weights"])
    assert results["progressions"]["greedy_ensemble"][0]["ingredient"] == names[first]
    # Costs are in every row, and the report ranks every method against the best ingredient.
    for name, row in rows.items():
        if name != "best_ingredient":
            assert row["heldout_evals"] >= 0 and set(row["vs_best"]["test"]) >= {"diff", "p"}, name
    text = (out / "report.md").read_text()
    assert "Hyperparameters chosen on the held-out split" in text and "WiSE-FT" in text
    assert (out / "wise_ft.png").stat().st_size > 0


# Runs every registered method through soup.py's own flags and main(), one after another in one fresh
# process (absl defines each flag once per process, and other tests' CLIs define some of the same names).
_EACH_METHOD = """
import json, sys
import tensorflow_datasets as tfds
from soupjax import methods, soup
ingredients, out, small = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for method in methods.methods():
    soup.FLAGS.unparse_flags()
    soup.FLAGS(["soup", f"--recipe={method.name}", f"--ingredients={ingredients}", f"--out={out}", "--shifts=",
                *small])
    with tfds.testing.mock_data(num_examples=64):
        assert soup.main([]) == 0
    report = json.load(open(f"{out}/report.json"))
    expected = set(method.dishes(methods.resolve({k: soup.FLAGS[k].value for k in methods.all_options()})))
    got = {row["name"] for row in report["soups"]}
    assert expected <= got and report["meta"]["recipes"] == [method.name], (method.name, expected, got)
    print("cooked alone:", method.name, flush=True)
"""


@pytest.mark.slow
@pytest.mark.runs_first
def test_each_method_runs_alone_from_the_command_line(ingredients, tmp_path):
    """``python -m soupjax.soup --recipe NAME`` for every registered name, into one out directory (the
    ingredients' evaluations are cached, each recipe adds its dishes and writes its own report)."""
    import subprocess
    import sys
    # One point per grid: the choices are tested above, here each recipe's way through the command line.
    one_point = {k: v.split(",")[0] if isinstance(v, str) else v for k, v in SMALL_GRIDS.items()}
    small = [f"--{k}={v}" for k, v in one_point.items()]
    run = subprocess.run([sys.executable, "-c", _EACH_METHOD, str(ingredients), str(tmp_path / "soups"),
                          json.dumps(small)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    cooked = [line.split(": ", 1)[1] for line in run.stdout.splitlines() if line.startswith("cooked alone: ")]
    assert cooked == methods.names()


@pytest.mark.slow
def test_merges_need_the_shared_init(tmp_path, capsys):
    """Ingredients whose init cannot be rebuilt: 'all' leaves the merges out with the reason; one merge
    asked for by name is refused with it."""
    unknown = _make_ingredients(tmp_path / "ingredients", fingerprint="0123456789abcdef")
    with tfds.testing.mock_data(num_examples=MOCK):
        results = cooking.cook("all", unknown, tmp_path / "all", shifts=[], **SMALL_GRIDS)
        names = {row["name"] for row in results["soups"]}
        assert "uniform" in names and not names & {"ties", "task_arithmetic", "model_stock", "wise_ft_uniform"}
        assert "fingerprint 0123456789abcdef" in capsys.readouterr().out
        with pytest.raises(InputError, match="--recipe=ties works on the displacements from the shared init.*"
                                             "0123456789abcdef"):
            cooking.cook("ties", unknown, tmp_path / "ties", shifts=[], **SMALL_GRIDS)
        # The init is right but the start (the head init) recorded by the ingredients is another one.
        other_head = _make_ingredients(tmp_path / "other_head")
        for meta_file in other_head.glob("*/meta.json"):
            meta = json.loads(meta_file.read_text())
            meta_file.write_text(json.dumps({**meta, "start_fingerprint": "fedcba9876543210"}))
        with pytest.raises(InputError, match="started from fedcba9876543210"):
            cooking.cook("model_stock", other_head, tmp_path / "model_stock", shifts=[])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(2, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_greedy_ensemble_never_falls_below_its_first_model(k, n, classes, seed, strict):
    """Property: along the greedy ensemble's steps the kept ensemble's held-out accuracy never falls, it
    ends at least at the first (best) model's, and only models it kept are in it."""
    from soupjax.methods.greedy_ensemble import select
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = [rng.normal(size=(n, classes)) for _ in range(k)]
    order = list(rng.permutation(k))
    kept, steps = select(logits, labels, order, strict=strict)
    held = [s["soup_heldout"] for s in steps]
    assert held == sorted(held) and held[0] == steps[0]["heldout"]
    assert kept[0] == order[0] and set(kept) == {s["ingredient"] for s in steps if s["action"] == "add"}
    final = np.mean(np.mean([logits[i] for i in kept], axis=0).argmax(-1) == labels)
    assert final == pytest.approx(held[-1])
    # k copies of one model: all kept unless strict (equal accuracy does not rise).
    copies, _ = select([logits[0]] * k, labels, list(range(k)), strict=strict)
    assert copies == ([0] if strict else list(range(k)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_wise_ft_line_ends_at_the_init_and_the_base(size, seed):
    """WiSE-FT's point θ0 + α (θ − θ0) is task arithmetic with one ingredient: α = 0 is the init and
    α = 1 the base, bit for bit (float32 values, differences exact in float64)."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=size).astype(np.float32)
    base = (x0 + 0.01 * rng.normal(size=size)).astype(np.float32)
    assert np.array_equal(merging.task_arithmetic(x0, [base], 0.0), x0)
    assert np.array_equal(merging.task_arithmetic(x0, [base], 1.0), base)
    half = merging.task_arithmetic(x0, [base], 0.5)
    np.testing.assert_allclose(half, (x0.astype(np.float64) + base) / 2, rtol=1e-6, atol=1e-7)


def test_no_one_init_is_named_for_mixed_or_unrecorded_inits():
    from soupjax.training.shared_init import start_problem
    same = [{"init_fingerprint": "a"}, {"init_fingerprint": "a"}]
    assert start_problem(same) is None
    assert "2 different inits" in start_problem([{"init_fingerprint": "a"}, {"init_fingerprint": "b"}])
    assert "does not record" in start_problem([{}, *same])
    heads = [{"init_fingerprint": "a", "start_fingerprint": s} for s in ("x", "y")]
    assert "2 different points" in start_problem(heads)


def test_each_dare_dish_is_keyed_by_its_own_grid():
    dare = methods.get("dare")
    o = methods.resolve({})
    linear, ties = dare.key_of(o, "dare_linear"), dare.key_of(o, "dare_ties")
    assert "dare_scales" in linear and "ties_lambdas" not in linear
    assert "ties_lambdas" in ties and "dare_scales" not in ties
    assert dare.key_of(methods.resolve({"ties_lambdas": "3"}), "dare_linear") == linear


def test_slerp_ends_are_the_two_ingredients_statistics_included():
    """SLERP's t = 0 is the first ingredient and t = 1 the second, BatchNorm statistics too (they are
    weighed by t, not averaged), and t = 0.25 weighs the statistics 3:1: the model the registry's SLERP
    builds, as cooking and api.merge build it."""
    init = {"params": {"w": np.zeros(3, np.float32)}, "batch_stats": {"var": np.ones(2, np.float32)}}
    a = {"params": {"w": np.array([1, 0, 0], np.float32)}, "batch_stats": {"var": np.array([2, 3], np.float32)}}
    b = {"params": {"w": np.array([0, 2, 0], np.float32)}, "batch_stats": {"var": np.array([4, 6], np.float32)}}
    sources = [soup_arithmetic.TreeSource(a), soup_arithmetic.TreeSource(b)]
    slerp = methods.get("slerp").merge
    for t, want in ((0.0, a), (1.0, b)):
        got = slerp.build("slerp", {"t": t}, soup_arithmetic.TreeSource(init), sources, 0)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    quarter = slerp.build("slerp", {"t": 0.25}, soup_arithmetic.TreeSource(init), sources, 0)
    np.testing.assert_allclose(quarter["batch_stats"]["var"], [2.5, 3.75], rtol=1e-7)
    # The plain mean (what every other merge does with statistics) would be [3, 4.5].
    assert slerp.chosen([0.1, 0.3, 0.3]) == [1, 2]  # the two best, equal ones in ingredient order


def _independent_mask(seed: int, path: str, index: int, shape, p: float) -> np.ndarray:
    """DARE's keep-mask of one tensor of one ingredient, drawn here from numpy's documented pieces (a
    SeedSequence of (seed, crc32 of the path, the ingredient's index) into PCG64, one uniform per entry,
    kept where it is at least p), not through soupjax's generator."""
    import zlib
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(path.encode()), index])))
    return generator.random(shape) >= p


def test_dare_drops_the_masks_drawn_independently_at_the_rate_asked():
    """The registry's DARE (as cooking and api.merge build it) keeps exactly the entries of an
    independently drawn mask, rescaled by 1/(1 - p); and the share kept is 1 - p, within statistics."""
    rng = np.random.default_rng(0)
    init = {"params": {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": rng.normal(size=64).astype(np.float32)}}
    ends = [jax.tree_util.tree_map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), init) for _ in range(2)]
    dare = methods.get("dare").merge
    p, seed = 0.7, 11
    got = dare.build("dare_linear", {"p": p, "lambda": 1.0}, soup_arithmetic.TreeSource(init),
                     [soup_arithmetic.TreeSource(e) for e in ends], seed)
    kept = []
    for path in ("params/w", "params/b"):
        group, name = path.split("/")
        masks = [_independent_mask(seed, path, i, init[group][name].shape, p) for i in range(2)]
        taus = [e[group][name].astype(np.float64) - init[group][name] for e in ends]
        want = init[group][name] + sum(np.where(m, t / (1 - p), 0) for m, t in zip(masks, taus))
        np.testing.assert_allclose(got[group][name], want, rtol=1e-5, atol=1e-5, err_msg=path)
        kept += [m.mean() for m in masks]
        # An entry is the init exactly where both masks dropped it.
        both_dropped = ~masks[0] & ~masks[1]
        assert np.array_equal(got[group][name][both_dropped], init[group][name][both_dropped]), path
    n = 2 * (64 * 64 + 64)
    assert abs(np.average(kept, weights=[64 * 64, 64 * 64, 64, 64]) - (1 - p)) < 4 * np.sqrt(p * (1 - p) / n)


@pytest.mark.slow
def test_wise_ft_refuses_a_base_cooked_with_other_options(ingredients, tmp_path):
    out = tmp_path / "soups"
    with tfds.testing.mock_data(num_examples=MOCK):
        with pytest.raises(InputError, match="--wise_ft_of='': name at least one model"):
            cooking.cook("wise_ft", ingredients, out, shifts=[], wise_ft_of="")
        with pytest.raises(InputError, match="the task_arithmetic soup is not in"):
            cooking.cook("wise_ft", ingredients, out, shifts=[], wise_ft_of="task_arithmetic")
        cooking.cook("task_arithmetic", ingredients, out, shifts=[], task_arithmetic_scales="0.5")
        with pytest.raises(InputError, match=r"the task_arithmetic soup in .* was cooked from other ingredients or "
                                             r"options \(task_arithmetic_scales: \[0.5\] -> \[2.0\]"):
            cooking.cook("wise_ft", ingredients, out, shifts=[], wise_ft_of="task_arithmetic",
                         task_arithmetic_scales="2", wise_ft_alphas="0,1")
        results = cooking.cook("wise_ft", ingredients, out, shifts=[], wise_ft_of="task_arithmetic,task_arithmetic",
                               task_arithmetic_scales="0.5", wise_ft_alphas="0,1")
    assert [r["name"] for r in results["soups"]].count("wise_ft_task_arithmetic") == 1


@pytest.mark.slow
def test_greedy_ties_order_decides_between_tied_ingredients(tmp_path):
    """Two ingredients of exactly equal held-out accuracy (the second is the first with its head scaled
    by 2: the same predictions, other weights) and a strict greedy soup: ``--greedy_ties=index`` keeps
    the first, ``official`` (the official code's reverse index order) the second; the greedy ensemble
    follows the same order."""
    import shutil
    root = _make_ingredients(tmp_path / "made")
    tied = tmp_path / "tied"
    shutil.copytree(root / "ing0", tied / "a")
    variables = checkpoints.load_variables(root / "ing0")
    variables["params"]["head"] = {k: v * 2 for k, v in variables["params"]["head"].items()}
    checkpoints.save_ingredient(tied / "b", variables, checkpoints.load_meta(root / "ing0"))
    soups = {}
    with tfds.testing.mock_data(num_examples=MOCK):
        for ties in ("index", "official"):
            out = tmp_path / ties
            rows = {}
            for recipe in ("greedy", "greedy_ensemble"):
                results = cooking.cook(recipe, tied, out, shifts=[], greedy_strict=True, greedy_ties=ties)
                rows.update({row["name"]: row for row in results["soups"]})
            heldout = [row["heldout"] for row in results["ingredients"]]
            assert heldout[0] == heldout[1]  # tied
            soups[ties] = checkpoints.load_variables(out / "greedy")
            want = [1.0, 0.0] if ties == "index" else [0.0, 1.0]
            assert rows["greedy"]["weights"] == want and rows["greedy_ensemble"]["weights"] == want, ties
            assert checkpoints.load_meta(out / "greedy")["options"]["greedy_ties"] == ties
    a, b = soups["index"]["params"]["head"]["kernel"], soups["official"]["params"]["head"]["kernel"]
    np.testing.assert_array_equal(np.asarray(b), 2 * np.asarray(a))


@pytest.mark.slow
def test_a_method_is_asked_only_for_the_dishes_not_cooked_yet(ingredients, tmp_path, monkeypatch, capsys):
    """Resume is the orchestrator's: with learned_global saved and learned_layer lost, a rerun reuses the
    first and asks the learned method for the second alone (the method knows nothing of what is saved)."""
    import shutil
    from soupjax.arithmetic import learned
    modes = []
    real = learned.learned
    monkeypatch.setattr(learned, "learned", lambda *a, mode, **k: modes.append(mode) or real(*a, mode=mode, **k))
    out = tmp_path / "soups"
    options = {"learned_epochs": 1, "learned_mode": "both", "shifts": []}
    with tfds.testing.mock_data(num_examples=MOCK):
        cooking.cook("learned", ingredients, out, **options)
        assert modes == ["global", "layer"]
        shutil.rmtree(out / "learned_layer")
        capsys.readouterr()
        results = cooking.cook("learned", ingredients, out, **options)
    assert modes == ["global", "layer", "layer"]
    assert "learned_global: cooked earlier, reused" in capsys.readouterr().out
    assert [row["name"] for row in results["soups"]] == ["best_ingredient", "learned_global", "learned_layer"]


def test_a_list_of_recipes_is_cooked_in_the_registry_order():
    """--recipe a,b: one cook of those methods, each after the soups it starts from (wise_ft after greedy)."""
    assert [m.name for m in methods.wanted("wise_ft,greedy,uniform")] == ["uniform", "greedy", "wise_ft"]
    assert [m.name for m in methods.wanted("uniform, uniform")] == ["uniform"]
    for bad, fragment in (("uniform,soup_of_the_day", "'soup_of_the_day'"), ("uniform,all", "a list names methods only"),
                          ("uniform,", "a list names methods only")):
        with pytest.raises(InputError, match=fragment):
            methods.wanted(bad)
