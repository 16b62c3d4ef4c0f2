"""The Python API: README's example, run as written (on tiny mock ingredients), and what it returns."""
from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from soupjax import api
from soupjax.arithmetic import merging
from soupjax.cli.errors import InputError

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
        # evaluate() agrees with the kitchen's evaluation of the same model saved as an ingredient.
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
