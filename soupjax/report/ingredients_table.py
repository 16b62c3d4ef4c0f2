"""The report's "## Ingredients" section: every fine-tuned model, best held-out first, with the
hyperparameters that tell them apart and the selective soups that kept each one."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from soupjax.report import fields
from soupjax.report.formatting import MISSING, num, pct, short, table


def _hparam_split(ingredients: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Splits hyper-parameters into those that vary across ingredients and those all share.

    Only the varying ones identify an ingredient; the shared ones are printed once under the table.
    """
    keys: list[str] = []
    for ing in ingredients:
        for key in ing.get("hparams") or {}:
            if key not in keys:
                keys.append(key)
    varying, shared = [], {}
    for key in keys:
        # Compare through JSON so lists and dicts compare by value; a missing key counts as a difference.
        seen = {json.dumps((ing.get("hparams") or {}).get(key, "<missing>"), sort_keys=True, default=str)
                for ing in ingredients}
        if len(seen) > 1:
            varying.append(key)
        else:
            shared[key] = (ingredients[0].get("hparams") or {}).get(key)
    return varying, shared


def _selectors(results: Mapping[str, Any]) -> dict[int, list[str]]:
    """Ingredient index -> the selective soups (greedy, pruned, ...) that kept it.

    A soup is selective when some ingredient has weight 0; uniform and learned soups use all of them,
    so listing them would add nothing.
    """
    chosen: dict[int, list[str]] = {}
    for soup in results.get("soups") or []:
        weights = soup.get("weights")
        if soup.get("kind") != "soup" or not isinstance(weights, Sequence):
            continue
        values = [num(w) or 0.0 for w in weights]
        if all(v > 0 for v in values):
            continue
        for i, w in enumerate(values):
            if w > 0:
                chosen.setdefault(i, []).append(str(soup.get("name")))
    return chosen


def section(results: Mapping[str, Any]) -> list[str]:
    """The "## Ingredients" section, or nothing when the results list no ingredients."""
    ingredients = list(results.get("ingredients") or [])
    if not ingredients:
        return []
    shifts = fields.has_shifts(ingredients)
    varying, shared = _hparam_split(ingredients)
    selectors = _selectors(results)
    headers = ["#", "ingredient", "held-out %", "test %", "test loss"]
    numeric = [True, False, True, True, True]
    if shifts:
        headers.append("shift mean %")
        numeric.append(True)
    if varying:
        headers.append("hparams")
        numeric.append(False)
    if selectors:
        headers.append("in soups")
        numeric.append(False)
    headers.append("path")
    numeric.append(False)

    # Best held-out first: the order the greedy soup visits them in. The '#' column keeps the
    # original index, which is how progressions and soup weights refer to an ingredient.
    order = sorted(range(len(ingredients)),
                   key=lambda i: -(num(ingredients[i].get("heldout")) or -math.inf))
    rows = []
    for i in order:
        ing = ingredients[i]
        loss = fields.test_loss(ing)
        row = [i, ing.get("name", i), pct(ing.get("heldout")), pct(fields.test_accuracy(ing)),
               MISSING if loss is None else f"{loss:.4f}"]
        if shifts:
            row.append(pct(ing.get("shift_mean")))
        if varying:
            hp = ing.get("hparams") or {}
            row.append(", ".join(f"{k}={short(hp[k])}" for k in varying if k in hp) or MISSING)
        if selectors:
            row.append(", ".join(selectors.get(i, [])) or MISSING)
        row.append(f"`{ing['path']}`" if ing.get("path") else MISSING)
        rows.append(row)
    lines = ["## Ingredients", "", table(headers, rows, numeric)]
    if shared:
        common = ", ".join(f"{k}={short(v)}" for k, v in shared.items())
        lines += ["", f"Shared by all ingredients: {common}"]
    return lines
