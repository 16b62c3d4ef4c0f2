"""Checks before cooking: the ingredients must be soupable, and the user is told exactly why not.

* The directory exists and holds ingredients; a sub-directory with only half an ingredient (meta.json
  without variables/ or the reverse) is named, not skipped: it is an ingredient the user expects.
* A soup or merge saved by cooking (its meta.json names its recipe and method) is no ingredient: it is
  left out with a warning, so that a soup written among the ingredients never joins a later soup.
* Every ingredient reads: a malformed or future-format meta.json, a truncated or deleted checkpoint
  file is an ``IngredientError`` naming it (from ``checkpoints``).
* Same number of classes (the heads' sizes): ingredients of two tasks are named as such.
* Same tree, shapes and dtypes everywhere (read from checkpoint metadata, nothing loaded): the first
  mismatching parameter path is named with both shapes.
* Same init fingerprint: ingredients fine-tuned from different inits do not share a loss basin, and
  their average collapses (the paper's Figure/Appendix on models trained from scratch).
* No NaN or Inf: such an ingredient is named and left out, with a warning (an ``IngredientWarning``,
  which the soup command prints as one line); when none is left, an error.

Every refusal is a ``PreflightError``, an ``InputError``: the command line shows its one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from soupjax.io import checkpoints, files
from soupjax.io.trees import Layout
from soupjax.cli.errors import InputError


class PreflightError(InputError):
    """Ingredients that cannot be souped together; the message says which and why."""


class IngredientWarning(UserWarning):
    """An ingredient left out of every soup (the message says which and why)."""


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


def _layout(ingredient: Ingredient) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """path -> (shape, stored dtype) of an ingredient, from its checkpoint metadata (nothing loaded)."""
    layout = Layout.of(checkpoints.variables_structure(ingredient.path))[0]
    return dict(zip(layout.paths, zip(layout.shapes, layout.dtypes)))


def _classes(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> tuple[str, int] | None:
    """``(path, number of classes)`` of a classifier's head (its bias: ``.../head/bias``), if any."""
    heads = sorted(path for path in layout if path.endswith("head/bias"))
    return (heads[0], int(layout[heads[0]][0][-1])) if heads and layout[heads[0]][0] else None


def check_structures(ingredients: Sequence[Ingredient]) -> None:
    """Raise ``PreflightError`` at the first parameter whose path, shape or dtype differs.

    Parameters are named as ``trees.path_str`` names them everywhere. Heads of different sizes are
    reported first, as different numbers of classes: that is what the user did (fine-tuned on two
    tasks), not a different architecture.
    """
    reference = _layout(ingredients[0])
    classes = _classes(reference)
    for other in ingredients[1:]:
        layout = _layout(other)
        theirs = _classes(layout)
        if classes and theirs and theirs[0] == classes[0] and theirs[1] != classes[1]:
            raise PreflightError(
                f"ingredient {other.name} has {theirs[1]} classes, {ingredients[0].name} has {classes[1]} "
                f"({classes[0]}): a soup averages models of one task; fine-tune every ingredient on the same classes")
        for path in sorted(set(reference) | set(layout)):
            a, b = reference.get(path), layout.get(path)
            if a is None or b is None:
                where = ingredients[0].name if a is None else other.name
                raise PreflightError(
                    f"parameter {path} exists in {other.name if a is None else ingredients[0].name} "
                    f"but not in {where}: ingredients must share one architecture")
            if a != b:
                raise PreflightError(
                    f"parameter {path}: {ingredients[0].name} has shape {a[0]} {a[1]}, "
                    f"{other.name} has shape {b[0]} {b[1]}: ingredients must share one architecture")


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


def non_finite_tensors(directory: str | os.PathLike) -> list[str]:
    """Paths of an ingredient's floating-point arrays that hold a NaN or an Inf, read one at a time.

    Every array is read, so this is also the check that the checkpoint is whole: a truncated or
    missing array file is an ``IngredientError`` naming the parameter. Reading through TensorStore
    one array at a time (not an orbax restore of the tree) keeps memory at one tensor and lets a
    failed read end cleanly: a failed orbax restore leaves reads in flight on its event loop, which
    print a traceback when they finish after it closed.
    """
    source = checkpoints.tensor_source(directory)
    return [path for path, dtype in zip(source.paths, source.dtypes)
            if np.issubdtype(dtype, np.floating) and not np.isfinite(source.read(path).astype(np.float32)).all()]


def drop_non_finite(ingredients: Sequence[Ingredient]) -> list[Ingredient]:
    """Read each ingredient once (one tensor at a time) and leave out, with a warning, those with NaN/Inf."""
    kept = []
    for ing in ingredients:
        bad = non_finite_tensors(ing.path)
        if bad:
            warnings.warn(f"ingredient {ing.name} ({ing.path}) has NaN or Inf in {len(bad)} tensor(s), "
                          f"first {bad[0]}; it is left out of every soup", IngredientWarning, stacklevel=2)
        else:
            kept.append(ing)
    return kept


def find(root: str | os.PathLike) -> list[Path]:
    """The ingredient directories under ``root``; ``PreflightError`` when it is missing, holds none,
    or holds a half-written one (meta.json without variables/ or the reverse).

    Hidden entries (``.NAME.tmp-*``, a save that was interrupted) are not ingredients and are skipped.
    """
    root = files.as_path(root)
    if not root.exists():
        raise PreflightError(f"the ingredients directory {root} does not exist (python -m soupjax.finetune "
                             "writes WORKDIR/ingredients; pass --ingredients DIR)")
    if not root.is_dir():
        raise PreflightError(f"the ingredients directory {root} is not a directory")
    if _partial(root) is not None or checkpoints.is_ingredient(root):
        candidates = [root]
    else:
        entries = sorted(p for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and not checkpoints.is_start(p))
        candidates = []
        for path in entries:  # one marker lookup each: on gs:// every one is a request
            if files.is_committed(path):
                candidates.append(path)
            else:
                # On gs://, no marker: a save still running or killed, or a local ingredient copied
                # into the bucket without one (a local result is finished by its rename instead).
                warnings.warn(f"{path}: no {files.MARKER} marker (a save still running or killed, or a copy "
                              "made without it); left out", IngredientWarning, stacklevel=2)
    for path in candidates:
        missing = _partial(path)
        if missing is not None:
            raise PreflightError(f"ingredient {path} is incomplete: {missing} is missing; fine-tune it again "
                                 "or move it out of the ingredients directory")
    paths = [p for p in candidates if checkpoints.is_ingredient(p)]
    for path in [p for p in paths if _cooked_from(p) is not None]:
        # A soup saved among the ingredients (an --out inside them, a copy) would join every later soup.
        warnings.warn(f"{path} is a {_cooked_from(path)} cooked by soupjax, not an ingredient: it is left out "
                      "(move it out of the ingredients directory)", IngredientWarning, stacklevel=2)
        paths.remove(path)
    if not paths:
        raise PreflightError(f"no ingredients found in {root} (expected sub-directories with meta.json and "
                             "variables/, as written by python -m soupjax.finetune)")
    return paths


def _cooked_from(path: Path) -> str | None:
    """What a saved dish is ('soup (uniform)', 'merge (ties)'), or None for an ingredient: cooking
    writes its recipe and method into every soup's and merge's meta.json, training never does."""
    try:
        meta = json.loads((path / checkpoints.META_FILE).read_text())
    except (OSError, ValueError):
        return None  # an unreadable meta.json is named where it is read (checkpoints.load_meta)
    if not isinstance(meta, dict) or "recipe" not in meta or "method" not in meta:
        return None
    return f"{meta.get('kind', 'soup')} ({meta['recipe']})"


def _partial(path: Path) -> str | None:
    """What a half ingredient lacks (``meta.json`` or ``variables/``); None for a whole one or none."""
    has_meta = (path / checkpoints.META_FILE).exists()
    has_variables = (path / checkpoints.VARIABLES_DIR).exists()
    if has_meta == has_variables:
        return None
    return checkpoints.VARIABLES_DIR + "/" if has_meta else checkpoints.META_FILE


def gather(root: str | Path, *, allow_mixed_init: bool = False, check_finite: bool = True) -> list[Ingredient]:
    """Find the ingredients under ``root`` and run every pre-flight check; returns the usable ones."""
    paths = find(root)
    ingredients = [Ingredient(p, checkpoints.load_meta(p)) for p in paths]
    check_structures(ingredients)
    check_init(ingredients, allow_mixed_init)
    if check_finite:
        ingredients = drop_non_finite(ingredients)
        if not ingredients:
            raise PreflightError(f"every ingredient in {root} has NaN or Inf parameters")
    return ingredients
