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
    """The variables the ingredients started from (``init_from``, then the head init): the start training
    wrote beside them, or else rebuilt from their config, checked against the fingerprints they recorded;
    ``InputError`` saying why when it cannot be."""
    from soupjax.training import shared_init as init_module
    try:
        return init_module.load_start(ingredients[0].path.parent, [ing.meta for ing in ingredients], config_of(ingredients))
    except InputError as e:
        raise InputError(f"{e}: pass init= to merge() yourself") from e


def merge(method: str, ingredients: Sequence[preflight.Ingredient], *, init: Variables | None = None,
          **hyperparameters: Any) -> Variables:
    """One model from ``ingredients`` by ``method`` with fixed ``hyperparameters``, streamed per tensor.

    The method is the registry's (``soupjax.methods``): the model is the one its recipe builds for the
    same point of its grid, bit for bit, as a one-point grid of ``cook`` would choose it. 'uniform' needs
    no init and no hyperparameters; the merges ('task_arithmetic' (lam), 'ties' (density, lam),
    'dare_linear' and 'dare_ties' (p, lam, seed, default 0), 'slerp' (t; between the two best
    ingredients by the held-out accuracy each recorded in its meta.json, equal ones in ingredient order,
    as cooking ranks them), 'spherical_mean', 'model_stock') work on displacements from ``init``
    (default: ``shared_init(ingredients)``), a variables tree with the ingredients' structure, held in
    memory; the ingredients are read from disk one tensor at a time. ``lam`` is λ as the recipe's grid
    records it (task arithmetic and DARE linear: λ itself, not the scale λ·K). Conventions:
    ``soupjax.arithmetic.merging``.
    """
    found = methods.method_of_dish(method)
    if found is None or found.merge is None:
        merges = [d for m in methods.methods() if m.merge for d in m.merge.hyperparameters]
        raise InputError(f"merge: unknown method {method!r}; choose from {', '.join(merges)} (the selecting "
                         "recipes, greedy/pruned/learned/WiSE-FT, choose on held-out data: use cook)")
    names = found.merge.hyperparameters[method]
    unknown = sorted(set(hyperparameters) - set(names))
    missing = [n for n in names if n != "seed" and n not in hyperparameters]
    if unknown or missing:
        said = "; ".join([*([f"unknown hyperparameter(s) {', '.join(unknown)}"] if unknown else []),
                          *([f"missing {', '.join(missing)}"] if missing else [])])
        raise InputError(f"merge({method!r}): {said}; it takes {', '.join(names) or 'none'}")
    # The one point of the method's grid, named as the grid names it (lam is the grid's 'lambda').
    point = {("lambda" if n == "lam" else n): float(hyperparameters[n]) for n in names if n != "seed"}
    heldout = [ing.heldout_accuracy for ing in ingredients]
    if found.merge.pick is not None:  # SLERP: the two best, as cooking picks them
        if len(ingredients) < 2:
            raise InputError(f"merge({method!r}) interpolates between two ingredients, got {len(ingredients)}")
        unrecorded = [ing.name for ing, h in zip(ingredients, heldout) if h is None]
        if unrecorded:
            raise InputError(f"merge({method!r}) picks the two best ingredients by held-out accuracy, which the "
                             f"meta.json of {', '.join(unrecorded)} does not record (metrics.heldout.accuracy)")
    picked = found.merge.chosen(heldout)
    sources = [checkpoints.tensor_source(ingredients[i].path) for i in picked]
    init_source = None
    if found.needs_init:
        init_source = soup_arithmetic.TreeSource(init if init is not None else shared_init(ingredients))
    return found.merge.build(method, point, init_source, sources, int(hyperparameters.get("seed", 0)))


def evaluate(variables: Variables, ingredients_or_config: Sequence[preflight.Ingredient] | ConfigDict, *,
             split: str = "test", batch_size: int | None = None) -> dict[str, float]:
    """Accuracy and loss of ``variables`` on ``split`` ('heldout', 'test' or a shift split) of the data the
    ingredients were fine-tuned on (or of ``config``), jitted and data-parallel over every device."""
    from soupjax import data, models
    from soupjax.evaluation import evaluate as evaluation
    if isinstance(ingredients_or_config, ConfigDict):  # a run's config: its activation as training resolves it
        from soupjax.importers.activation import resolve_activation
        config, activation = ingredients_or_config, resolve_activation(ingredients_or_config)
    else:  # the activation the ingredients were trained with, as their meta.json records it
        config, activation = config_of(ingredients_or_config), ingredients_or_config[0].meta.get("activation")
    evaluator = evaluation.for_model(models.build_model_from_run_config(config, activation))
    result = evaluator(dict(variables), data.eval_batches(config.data, split, batch_size or config.eval_batch_size),
                       projection=data.logit_projection(config.data, split))
    return {"accuracy": float(result.accuracy), "loss": float(result.loss)}


def cook(recipe: str, ingredients_dir: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """What ``python -m soupjax.soup --recipe RECIPE`` does for any recipe but 'inspect' (``cooking.cook``):
    the results dict of its report. ``options`` by the command line's names, e.g. ``ties_densities="0.2,0.5"``, ``shifts=[]``."""
    from soupjax import cooking
    return cooking.cook(recipe, Path(ingredients_dir), Path(out), **options)


def load_model(directory: str | Path) -> tuple[Variables, dict[str, Any]]:
    """A saved ingredient or soup: its variables and its meta.json."""
    return checkpoints.load_variables(directory), checkpoints.load_meta(directory)
