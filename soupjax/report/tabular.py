"""``report.csv``: one row per soup (in the report's ranking) and per ingredient, for spreadsheets.

Numbers are written at full precision (``repr``), so a script reading the CSV gets the values the
report was made from; a missing value is an empty cell. Columns for the optional per-row fields
(method, held-out evaluations, peak memory, chosen hyperparameters) appear only when some row has them.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from typing import Any

from soupjax.report import fields
from soupjax.report.formatting import num

_FIXED = ["type", "name", "n_ingredients", "heldout", "test_accuracy", "test_loss", "shift_mean"]
# Optional per-row fields, in column order; ``_optional`` says how each is written.
_OPTIONAL = ["method", "heldout_evals", "peak_memory_mb", "chosen"]


def _number(x: Any) -> str:
    number = num(x)
    return "" if number is None else repr(number)  # repr: full precision, round-trips exactly.


def _optional(key: str, value: Any) -> Any:
    if value is None:
        return ""
    if key == "heldout_evals":
        number = num(value)
        return "" if number is None else int(number)
    if key == "peak_memory_mb":
        return _number(value)
    if key == "chosen":
        # JSON keeps the choice machine-readable in one cell (the csv module quotes its commas).
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def csv_text(results: Mapping[str, Any]) -> str:
    """The text of ``report.csv`` for ``results``."""
    soups = fields.ranked_soups(results)
    optional = [key for key in _OPTIONAL if fields.has_field(soups, key)]
    names = _FIXED + optional
    # A shift split named like another column would overwrite it; prefix only in that unlikely case.
    split_columns = [(s, f"shift_{s}" if s in names else s) for s in fields.shift_splits(results)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names + [column for _, column in split_columns])

    def row(kind: str, entry: Mapping[str, Any], n: Any) -> list[Any]:
        shifts = entry.get("shifts") or {}
        return ([kind, entry.get("name", ""), "" if n is None else n, _number(entry.get("heldout")),
                 _number(fields.test_accuracy(entry)), _number(fields.test_loss(entry)),
                 _number(entry.get("shift_mean"))]
                + [_optional(key, entry.get(key)) for key in optional]
                + [_number(shifts.get(split)) for split, _ in split_columns])

    for soup in soups:
        writer.writerow(row(str(soup.get("kind", "soup")), soup, soup.get("n_ingredients")))
    for ing in results.get("ingredients") or []:
        writer.writerow(row("ingredient", ing, 1))
    return buffer.getvalue()
