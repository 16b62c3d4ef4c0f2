"""The report's sections on how each soup was chosen on the held-out split: the greedy and pruned
progressions, the learned soups' training curves and every hyperparameter grid a method searched.

The test split plays no part in any of these choices; these sections let a reader check that, and see
how much the choice mattered (a flat grid means the hyperparameter hardly matters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from soupjax.report import fields
from soupjax.report.formatting import MISSING, bold, num, options, pct, short, table


def progression_section(results: Mapping[str, Any]) -> list[str]:
    """One "## <recipe> soup: held-out accuracy with N ingredients" table per non-empty progression."""
    progressions = results.get("progressions") or {}
    names = fields.ingredient_names(results)
    lines: list[str] = []
    for recipe, records in progressions.items():
        if not records:
            continue
        has_soup = any("soup_heldout" in r for r in records)
        headers = ["step", "ingredient", "action", "ingredients in soup", "candidate held-out %"]
        numeric = [True, False, False, True, True]
        if has_soup:
            headers.append("soup held-out %")
            numeric.append(True)
        rows = []
        for r in records:
            row = [r.get("step", MISSING), fields.ingredient_label(r.get("ingredient"), names),
                   r.get("action", MISSING), r.get("n_ingredients", MISSING), pct(r.get("heldout"))]
            if has_soup:
                row.append(pct(r.get("soup_heldout")))
            rows.append(row)
        lines += ["", f"## {recipe} soup: held-out accuracy with N ingredients", "",
                  table(headers, rows, numeric)]
    return lines[1:] if lines else []


def learned_section(results: Mapping[str, Any]) -> list[str]:
    """"## Learned soups": loss and held-out accuracy at the start, the end and the best epoch."""
    history = results.get("learned_history") or {}
    rows = []
    for name, epochs in history.items():
        if not epochs:
            continue
        first, last = epochs[0], epochs[-1]
        scored = [(e.get("epoch", i), num(e.get("heldout_accuracy"))) for i, e in enumerate(epochs)]
        scored = [(ep, acc) for ep, acc in scored if acc is not None]
        best = max(scored, key=lambda t: t[1]) if scored else None
        loss0, loss1 = num(first.get("loss")), num(last.get("loss"))
        rows.append([
            name,
            last.get("epoch", len(epochs) - 1),
            MISSING if loss0 is None else f"{loss0:.4f}",
            MISSING if loss1 is None else f"{loss1:.4f}",
            pct(first.get("heldout_accuracy")),
            pct(last.get("heldout_accuracy")),
            f"{100 * best[1]:.2f} (epoch {best[0]})" if best else MISSING,
        ])
    if not rows:
        return []
    headers = ["learned soup", "epochs", "loss at start", "final loss", "held-out % at start",
               "final held-out %", "best held-out %"]
    return ["## Learned soups", "", table(headers, rows, [False] + [True] * 6)]


def _grid_table(grid: fields.Grid) -> str:
    """One row per grid point, one column per option; the chosen point in bold."""
    keys: list[str] = []
    for point in grid.points:
        keys += [k for k in point.options if k not in keys]
    rows = []
    for i, point in enumerate(grid.points):
        row = [short(point.options[k]) if k in point.options else MISSING for k in keys]
        row.append(pct(point.heldout))
        rows.append([bold(c) for c in row] if i == grid.chosen else row)
    # Right-align an option's column when every value it takes is a number, as the other numbers are.
    numeric = [all(num(p.options.get(k)) is not None for p in grid.points if k in p.options) for k in keys]
    return table(keys + ["held-out %"], rows, numeric + [True])


def grid_section(results: Mapping[str, Any]) -> list[str]:
    """"## Hyperparameters chosen on the held-out split": every grid point tried, the kept one bold."""
    # WiSE-FT's grid of α is its curve, which the WiSE-FT section shows with test and shift accuracy
    # beside it; listing it here too would only repeat the held-out column.
    curves = {c.name for c in fields.wise_ft_curves(results)}
    grids = [g for g in fields.grids(results) if g.name not in curves]
    if not grids:
        return []
    rows = {str(s.get("name")): s for s in results.get("soups") or []}
    text = "Every setting a method tried, with its held-out accuracy; **bold**: the one it kept."
    if curves:
        text += " WiSE-FT's α: see the WiSE-FT section."
    lines = ["## Hyperparameters chosen on the held-out split", "", text]
    for grid in grids:
        row = rows.get(grid.name) or {}
        facts = [f"{len(grid.points)} point{'s' if len(grid.points) != 1 else ''}"]
        if row.get("method"):
            facts.insert(0, f"method `{row['method']}`")
        if grid.recorded and grid.chosen is None:
            # The row names a choice the grid does not list (the method refined it afterwards, say):
            # show it rather than bold a point that was not kept.
            facts.append(f"chosen {options(row.get('chosen'))}, not one of the points below")
        elif not grid.recorded and grid.chosen is not None:
            facts.append("no choice recorded; bold marks the best held-out point")
        lines += ["", f"### {grid.name}", "", "; ".join(facts) + ".", "", _grid_table(grid)]
    return lines
