"""The Python API: README's example, run as written (on tiny mock ingredients), and what it returns."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from soupjax import api
from soupjax.arithmetic import merging
from soupjax.cli.errors import InputError

from conftest import COOK_ALL_OPTIONS

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    from test_methods import _make_ingredients
    _make_ingredients(tmp_path / "runs" / "soupjax" / "ingredients")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_readme_example_runs(workdir, capsys):
    with tfds.testing.mock_data(num_examples=64):
        exec(compile(_readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'ties':" in printed and "uniform {'accuracy':" in printed and "ties {'accuracy':" in printed
    assert (workdir / "runs" / "soupjax" / "soups" / "report.md").is_file()


@pytest.mark.slow
def test_merge_and_evaluate_are_the_arithmetic_and_the_accuracy(workdir):
    with tfds.testing.mock_data(num_examples=64):
        ingredients = api.load_ingredients("runs/soupjax/ingredients")
        init = api.shared_init(ingredients)
        loaded = [ing.load() for ing in ingredients]
        got = api.merge("task_arithmetic", ingredients, lam=0.5)
        want = jax.tree_util.tree_map(lambda x0, *xs: merging.task_arithmetic(
            np.asarray(x0, np.float32), [np.asarray(x, np.float32) for x in xs], 0.5), init, *loaded)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
        uniform = api.merge("uniform", ingredients)
        mean = jax.tree_util.tree_map(lambda *xs: np.mean(np.stack(xs), 0), *loaded)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), uniform, mean)
        # evaluate() agrees with cooking's evaluation of the same model saved as an ingredient.
        results = api.cook("uniform", "runs/soupjax/ingredients", "soups", shifts=[])
        row = next(r for r in results["soups"] if r["name"] == "uniform")
        assert api.evaluate(uniform, ingredients, split="test")["accuracy"] == pytest.approx(row["test"]["accuracy"])
        variables, meta = api.load_model("soups/uniform")
        assert meta["method"] == "uniform" and set(variables) == set(uniform)
        with pytest.raises(InputError, match="unknown method 'greedy'"):
            api.merge("greedy", ingredients)
        with pytest.raises(InputError, match="merge\\('ties'\\)"):
            api.merge("ties", ingredients, lam=1.0)  # density missing
    assert "ties" in api.recipes()  # the registry, by name


# One point per grid: cooking then makes exactly the model api.merge makes for that point.
@pytest.mark.slow
def test_merge_and_cooking_give_bit_identical_models(finetuned_workdir, cooked_all):
    """For every merge method of the registry, ``api.merge`` with the hyperparameters a one-point grid
    chose is, bit for bit, the model cooking saved (SLERP: the same two best ingredients). The cook is
    conftest's ``cooked_all``: ``--recipe all`` with one-point grids of values no default picks."""
    from soupjax import methods
    merges = [m for m in methods.methods() if m.merge is not None]
    assert {d for m in merges for d in m.merge.hyperparameters} >= {
        "uniform", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "spherical_mean", "model_stock"}
    ingredients = api.load_ingredients(finetuned_workdir["workdir"] / "ingredients")
    init = api.shared_init(ingredients)
    report = json.loads((cooked_all / "report.json").read_text())
    rows = {row["name"]: row for row in report["soups"]}
    seed = int(next(o for o in COOK_ALL_OPTIONS if o.startswith("--seed=")).split("=")[1])
    for method in merges:
        for dish, names in method.merge.hyperparameters.items():
            chosen = rows[dish]["chosen"] or {}
            given = {n: seed if n == "seed" else chosen["lambda" if n == "lam" else n] for n in names}
            got = api.merge(dish, ingredients, init=init, **given)
            saved = checkpoints_variables(cooked_all / dish)
            leaves = jax.tree_util.tree_leaves_with_path(saved)
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(saved), dish
            for (path, want), have in zip(leaves, jax.tree_util.tree_leaves(got)):
                assert np.asarray(have).dtype == np.asarray(want).dtype, (dish, path)
                assert np.array_equal(np.asarray(have), np.asarray(want)), (dish, jax.tree_util.keystr(path))
    pair = api.load_model(cooked_all / "slerp")[1]["pair"]
    heldout = {ing.name: ing.heldout_accuracy for ing in ingredients}
    assert pair == sorted(heldout, key=lambda n: -heldout[n])[:2]


def checkpoints_variables(directory: Path):
    return api.load_model(directory)[0]
