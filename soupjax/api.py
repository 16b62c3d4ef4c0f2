"""soupjax from Python (a notebook, a script): load ingredients, merge them, evaluate, cook a recipe.

    from soupjax import api
    ingredients = api.load_ingredients("runs/soupjax/ingredients")
    soup = api.merge("uniform", ingredients)                        # a variables pytree, nothing chosen
    ties = api.merge("ties", ingredients, density=0.2, lam=1.0)     # fixed hyperparameters
    print(api.evaluate(soup, ingredients, split="test"))            # {'accuracy': ..., 'loss': ...}
    results = api.cook("greedy", "runs/soupjax/ingredients", "runs/soupjax/soups")   # what the CLI does

``merge`` computes one model with the hyperparameters you give (no held-out search, nothing written);
``cook`` is ``python -m soupjax.soup``: held-out grids, evaluations, saved soups and the report, with
the same options by the same names (``api.recipes()`` lists the methods, ``methods.all_options()`` the
options). Everything here is a thin layer over the modules the command line uses.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from soupjax import methods
from soupjax.io import checkpoints
from soupjax.arithmetic import merging
from soupjax.cooking import preflight
from soupjax.arithmetic import soups as soup_arithmetic
from soupjax.cli.errors import InputError

Variables = Mapping[str, Any]

def recipes() -> dict[str, str]:
    """Every method ``cook`` knows, with its one-line summary (``--recipe`` names, in cooking order)."""
    return {m.name: m.summary for m in methods.methods()}


def load_ingredients(directory: str | Path, *, allow_mixed_init: bool = False) -> list[preflight.Ingredient]:
    """The ingredients under ``directory``, checked as cooking checks them (``InputError`` naming a
    missing, half-written or incompatible one). Each has ``name``, ``path``, ``meta`` and ``load()``."""
    return preflight.gather(directory, allow_mixed_init=allow_mixed_init)


def config_of(ingredients: Sequence[preflight.Ingredient]) -> ConfigDict:
    """The config the ingredients were fine-tuned with (model, data, init), from the first one's meta.json."""
    return ConfigDict(ingredients[0].meta["config"])


def shared_init(ingredients: Sequence[preflight.Ingredient]) -> Variables:
    """The variables the ingredients started from (``init_from``, then the head init), rebuilt from their
    config and checked against the fingerprints they recorded; ``InputError`` saying why when it cannot be."""
    from soupjax.training import shared_init as init_module
    try:
        return init_module.rebuild_start(config_of(ingredients), [ing.meta for ing in ingredients])
    except InputError as e:
        raise InputError(f"{e}: pass init= to merge() yourself") from e


def merge(method: str, ingredients: Sequence[preflight.Ingredient], *, init: Variables | None = None,
          **hyperparameters: Any) -> Variables:
    """One model from ``ingredients`` by ``method`` with fixed ``hyperparameters``, streamed per tensor.

    'uniform' needs no init; the merges ('task_arithmetic' (lam), 'ties' (density, lam), 'dare_linear'
    and 'dare_ties' (p, lam, seed), 'slerp' (t; the first two ingredients), 'spherical_mean',
    'model_stock') work on displacements from ``init`` (default: ``shared_init(ingredients)``), a
    variables tree with the ingredients' structure, held in memory; the ingredients are read from disk
    one tensor at a time. Conventions of lam: ``soupjax.arithmetic.merging``.
    """
    sources = [checkpoints.tensor_source(ing.path) for ing in ingredients]
    if method == "uniform":
        if hyperparameters:
            raise InputError(f"merge('uniform') takes no hyperparameters, got {', '.join(hyperparameters)}")
        return soup_arithmetic.uniform_by_tensor(sources)
    if method not in merging.COMBINERS:
        raise InputError(f"merge: unknown method {method!r}; choose from uniform, {', '.join(merging.COMBINERS)} "
                         "(the selecting recipes, greedy/pruned/learned/WiSE-FT, choose on held-out data: use cook)")
    if method == "slerp":
        if len(sources) < 2:
            raise InputError(f"merge('slerp') interpolates between two ingredients, got {len(sources)}")
        sources = sources[:2]
    try:
        combine = merging.combiner(method, **hyperparameters)
    except TypeError as e:
        raise InputError(f"merge({method!r}): {e}") from e
    init_source = soup_arithmetic.TreeSource(init if init is not None else shared_init(ingredients))
    return merging.merge_by_tensor(init_source, sources, combine,
                                   unmerged=merging.statistics_rule(method, **hyperparameters))


def evaluate(variables: Variables, ingredients_or_config: Sequence[preflight.Ingredient] | ConfigDict, *,
             split: str = "test", batch_size: int | None = None) -> dict[str, float]:
    """Accuracy and loss of ``variables`` on ``split`` ('heldout', 'test' or a shift split) of the data the
    ingredients were fine-tuned on (or of ``config``), jitted and data-parallel over every device."""
    from soupjax import data, models
    from soupjax.devices import sharding
    from soupjax.evaluation.evaluate import Evaluator
    from soupjax.training.train_step import apply_for_eval
    config = (ingredients_or_config if isinstance(ingredients_or_config, ConfigDict)
              else config_of(ingredients_or_config))
    evaluator = Evaluator(apply_for_eval(models.build_model(config)), sharding.data_mesh())
    result = evaluator(dict(variables), data.eval_batches(config.data, split, batch_size or config.eval_batch_size),
                       projection=data.logit_projection(config.data, split))
    return {"accuracy": float(result.accuracy), "loss": float(result.loss)}


def cook(recipe: str, ingredients_dir: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """What ``python -m soupjax.soup --recipe RECIPE`` does for any recipe but 'inspect' (``kitchen.cook``):
    the results dict of its report. ``options`` by the command line's names, e.g. ``ties_densities="0.2,0.5"``, ``shifts=[]``."""
    from soupjax.cooking import kitchen
    return kitchen.cook(recipe, Path(ingredients_dir), Path(out), **options)


def load_model(directory: str | Path) -> tuple[Variables, dict[str, Any]]:
    """A saved ingredient or soup: its variables and its meta.json."""
    return checkpoints.load_variables(directory), checkpoints.load_meta(directory)
