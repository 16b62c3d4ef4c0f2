"""Checks before cooking: the ingredients must be soupable, and the user is told exactly why not.

* Same tree, shapes and dtypes everywhere (read from checkpoint metadata, nothing loaded): the first
  mismatching parameter path is named with both shapes.
* Same init fingerprint: ingredients fine-tuned from different inits do not share a loss basin, and
  their average collapses (the paper's Figure/Appendix on models trained from scratch).
* No NaN or Inf: such an ingredient is named and left out, with a warning.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from soupjax import checkpoints


class PreflightError(ValueError):
    """Ingredients that cannot be souped together; the message says which and why."""


@dataclasses.dataclass
class Ingredient:
    """An ingredient on disk: its directory, name and meta.json. Variables are loaded on demand."""
    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def heldout_accuracy(self) -> float | None:
        return self.meta.get("metrics", {}).get("heldout", {}).get("accuracy")

    def load(self) -> dict[str, Any]:
        return checkpoints.load_variables(self.path)


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_structures(ingredients: Sequence[Ingredient]) -> None:
    """Raise ``PreflightError`` at the first parameter whose path, shape or dtype differs."""
    reference = _flat(checkpoints.variables_structure(ingredients[0].path))
    for other in ingredients[1:]:
        flat = _flat(checkpoints.variables_structure(other.path))
        for path in sorted(set(reference) | set(flat)):
            a, b = reference.get(path), flat.get(path)
            if a is None or b is None:
                where = ingredients[0].name if a is None else other.name
                raise PreflightError(
                    f"parameter {path} exists in {other.name if a is None else ingredients[0].name} "
                    f"but not in {where}: ingredients must share one architecture")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise PreflightError(
                    f"parameter {path}: {ingredients[0].name} has shape {tuple(a.shape)} {a.dtype}, "
                    f"{other.name} has shape {tuple(b.shape)} {b.dtype}: ingredients must share one architecture")


def check_init(ingredients: Sequence[Ingredient], allow_mixed_init: bool) -> None:
    """Refuse ingredients fine-tuned from different inits unless explicitly allowed."""
    groups: dict[str, list[str]] = {}
    for ing in ingredients:
        groups.setdefault(str(ing.meta.get("init_fingerprint", "unknown")), []).append(ing.name)
    if len(groups) > 1:
        detail = "; ".join(f"init {fp}: {', '.join(names)}" for fp, names in sorted(groups.items()))
        message = (f"ingredients start from {len(groups)} different inits ({detail}). Soups need ingredients "
                   "fine-tuned from one shared init: averaging models from different inits lands between "
                   "loss basins and collapses towards chance.")
        if not allow_mixed_init:
            raise PreflightError(message + " Pass --allow_mixed_init to cook anyway (e.g. to show the collapse).")
        warnings.warn(message + " Cooking anyway (--allow_mixed_init).", stacklevel=2)


def finite(variables: Any) -> list[str]:
    """Paths of leaves that hold a NaN or an Inf (empty when all are finite)."""
    return [path for path, leaf in _flat(variables).items()
            if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.isfinite(np.asarray(leaf, np.float32)).all()]


def drop_non_finite(ingredients: Sequence[Ingredient]) -> list[Ingredient]:
    """Load each ingredient once (one at a time) and leave out, with a warning, those with NaN/Inf."""
    kept = []
    for ing in ingredients:
        bad = finite(ing.load())
        if bad:
            warnings.warn(f"ingredient {ing.name} ({ing.path}) has NaN or Inf in {len(bad)} tensor(s), "
                          f"first {bad[0]}; it is left out of every soup", stacklevel=2)
        else:
            kept.append(ing)
    return kept


def gather(root: str | Path, *, allow_mixed_init: bool = False, check_finite: bool = True) -> list[Ingredient]:
    """Find the ingredients under ``root`` and run every pre-flight check; returns the usable ones."""
    paths = checkpoints.list_ingredients(root)
    if not paths:
        raise PreflightError(f"no ingredients found in {root} (expected sub-directories with meta.json and "
                             "variables/, as written by python -m soupjax.finetune)")
    ingredients = [Ingredient(p, checkpoints.load_meta(p)) for p in paths]
    check_structures(ingredients)
    check_init(ingredients, allow_mixed_init)
    if check_finite:
        ingredients = drop_non_finite(ingredients)
        if not ingredients:
            raise PreflightError(f"every ingredient in {root} has NaN or Inf parameters")
    return ingredients
