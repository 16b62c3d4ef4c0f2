"""The Markdown report (``report.md``): a header with the run's facts, then one section per part of
the results, each written by the module that knows that part."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from soupjax.report import ingredients_table, selection, soups_table, wise_ft
from soupjax.report.formatting import count


def _header(results: Mapping[str, Any]) -> list[str]:
    meta = results.get("meta") or {}
    splits = meta.get("splits") or {}
    lines = ["# Model soup report", ""]
    facts = [
        ("dataset", meta.get("dataset")),
        ("model", meta.get("model")),
        ("ingredients", f"{len(results.get('ingredients') or [])} from `{meta.get('ingredients_dir')}`"
         if meta.get("ingredients_dir") else len(results.get("ingredients") or [])),
        ("recipes", ", ".join(meta.get("recipes") or []) or None),
        ("held-out examples", count(splits.get("heldout"))),
        ("test examples", count(splits.get("test"))),
        ("shift sets", ", ".join(splits.get("shifts") or []) or None),
        ("created", meta.get("created")),
    ]
    lines += [f"- {key}: {value}" for key, value in facts if value not in (None, "")]
    if meta.get("command"):
        lines += ["", "```", str(meta["command"]), "```"]
    return lines


def markdown_table(results: Mapping[str, Any]) -> str:
    """The Markdown report: soups, ingredients, greedy/pruned progressions, learned-soup curves,
    hyperparameter grids and WiSE-FT curves.

    Args:
      results: the soup CLI's results dict (see ``soupjax.report``); accuracies are fractions.

    Returns:
      Markdown text. Accuracies are percentages with two decimals; Δ columns are percentage points
      against the best ingredient with the McNemar p-value, bold when p < ``SIGNIFICANCE``. Sections
      whose fields the results lack are left out.
    """
    sections = [_header(results), soups_table.section(results), ingredients_table.section(results),
                selection.progression_section(results), selection.learned_section(results),
                selection.grid_section(results), wise_ft.section(results)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
