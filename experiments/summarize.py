"""Mean and spread of the study's table over several runs (different sweep seeds).

    python experiments/summarize.py runs/soupjax/study/soups-seed0 runs/soupjax/study/soups-seed1 ...

Reads each run's report.json and prints, per recipe, the mean and standard deviation over runs of the
held-out, test and mean-shift accuracy, of the difference to the best ingredient, and how many runs
had a significant (McNemar p < 0.05) gain or loss; where the runs recorded them, also the mean number
of held-out evaluations and the mean peak memory each recipe took to cook.

Every recipe that appears in any run gets a row (a method added after some runs were made is marked
with the number of runs it appears in), ranked as each run's report ranks them: the best ingredient
first, then by mean test accuracy, best first.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.report import fields
from soupjax.report.formatting import MISSING, SIGNIFICANCE, mebibytes, num, table


def _stat(values: Sequence[float]) -> str:
    """``mean ± sd`` in percent (sample sd; 0 for a single run), or MISSING with no values."""
    if not values:
        return MISSING
    pct = 100 * np.asarray(values, float)
    return f"{pct.mean():.2f} ± {pct.std(ddof=1) if len(pct) > 1 else 0:.2f}"


def _wins_losses(rows: Sequence[Mapping[str, Any]], which: str) -> str:
    """``wins/losses``: runs where the row is significantly better / worse than the best ingredient."""
    tests = [t for t in (fields.vs_best(r, which) for r in rows)
             if isinstance(t, Mapping) and num(t.get("p")) is not None and num(t.get("diff")) is not None]
    if not tests:
        return MISSING
    wins = sum(t["p"] < SIGNIFICANCE and t["diff"] > 0 for t in tests)
    losses = sum(t["p"] < SIGNIFICANCE and t["diff"] < 0 for t in tests)
    return f"{wins}/{losses}"


def _values(rows: Sequence[Mapping[str, Any]], get: Callable[[Mapping[str, Any]], Any]) -> list[float]:
    """The finite numbers ``get`` finds in ``rows``: a run that lacks the field is left out of the mean."""
    return [v for v in (num(get(r)) for r in rows) if v is not None]


def _delta(rows: Sequence[Mapping[str, Any]], which: str) -> list[float]:
    return _values(rows, lambda r: (fields.vs_best(r, which) or {}).get("diff"))


def summary_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table of mean ± sd over ``reports`` (each a run's report.json), one row per recipe."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for rep in reports:
        for row in rep.get("soups") or []:
            by_name.setdefault(str(row.get("name")), []).append(row)
    # One entry per recipe with what the ranking needs: its name, its kind and its mean test accuracy.
    entries = [{"name": name, "kind": rows[0].get("kind"), "rows": rows,
                "test": float(np.mean(accs)) if (accs := _values(rows, fields.test_accuracy)) else None}
               for name, rows in by_name.items()]
    entries = fields.ranked(entries, accuracy=lambda e: e["test"])
    all_rows = [r for rows in by_name.values() for r in rows]
    show_evals = fields.has_field(all_rows, "heldout_evals")
    show_memory = fields.has_field(all_rows, "peak_memory_mb")
    is_reference = fields.is_reference(entries)

    headers = ["recipe", "ingredients", "test %", "Δ test vs best", "p<0.05 (+/−)", "shift mean %",
               "Δ shift vs best", "p<0.05 (+/−)"]
    if show_evals:
        headers.append("held-out evals")
    if show_memory:
        headers.append("peak memory")
    table_rows = []
    for entry in entries:
        rows = entry["rows"]
        name = entry["name"]
        if len(rows) < len(reports):
            name += f" ({len(rows)}/{len(reports)} runs)"
        no_delta = "(reference)" if is_reference(entry) else MISSING
        dtest, dshift = _delta(rows, "test"), _delta(rows, "shift")
        n = _values(rows, lambda r: r.get("n_ingredients"))
        cells = [name, f"{np.mean(n):.1f}" if n else MISSING, _stat(_values(rows, fields.test_accuracy)),
                 _stat(dtest) if dtest else no_delta, _wins_losses(rows, "test"),
                 _stat(_values(rows, lambda r: r.get("shift_mean"))),
                 _stat(dshift) if dshift else no_delta, _wins_losses(rows, "shift")]
        if show_evals:
            evals = _values(rows, lambda r: r.get("heldout_evals"))
            cells.append(f"{np.mean(evals):,.1f}".removesuffix(".0") if evals else MISSING)
        if show_memory:
            memory = _values(rows, lambda r: r.get("peak_memory_mb"))
            cells.append(mebibytes(np.mean(memory)) if memory else MISSING)
        table_rows.append(cells)
    return table(headers, table_rows, [False] + [True] * (len(headers) - 1))


def main(paths: list[str]) -> None:
    """Prints the summary of the runs in ``paths`` (directories holding a report.json)."""
    reports = [json.loads((Path(p) / "report.json").read_text()) for p in paths]
    print(f"{len(reports)} runs: {', '.join(paths)}\n")
    print(summary_table(reports))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
