"""The soup report: Markdown, JSON and CSV tables and PNG plots of what ``soup`` cooked.

The soup CLI gathers one ``results`` dict (meta data, per-ingredient metrics, per-soup metrics with a
paired McNemar comparison against the best ingredient, greedy/pruned progressions and learned-soup
training curves; all accuracies are fractions) and hands it to ``write_report``, which writes

* ``report.md``   the tables a user reads (``markdown_table``),
* ``report.json`` the results exactly as given, for scripts,
* ``report.csv``  one row per soup and per ingredient, for spreadsheets,
* ``scatter.png`` the paper's Figure 1 (held-out vs test, test vs mean shift accuracy),
* ``greedy.png``  held-out accuracy against the number of ingredients (greedy and pruned soups).

``soup --recipe inspect`` measures the geometry of the ingredients (angles and distances between their
fine-tuning updates, held-out accuracy along the line between two of them); ``inspect_table`` and
``write_inspect`` report that.

Every file is written under a temporary name in the output directory and renamed into place, so a crash
or a full disk never leaves a half-written report that looks complete. Plots use matplotlib's Agg canvas
directly (no pyplot), so nothing needs a screen and no global backend state is touched.

Every field except the top-level keys is optional: a run without shift sets, progressions or learned
soups gives a report without those columns and sections rather than an error.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from soupjax import files as soupjax_files  # `files` is the name of a report's set of files below
from soupjax import stats

__all__ = ["SIGNIFICANCE", "markdown_table", "write_report", "inspect_table", "write_inspect"]

# p-values below this are shown in bold. A conventional threshold: the point is to make a reader look
# twice before believing a 0.1-point gain, not to run a formal multiple-comparison procedure.
SIGNIFICANCE = 0.05

# Main-table order: the reference first, the one-forward-pass soups next, the K-pass ensemble last
# (it is the upper bound a soup is measured against, at K times the inference cost).
_KIND_ORDER = {"individual": 0, "soup": 1, "ensemble": 3}
_MISSING = "–"


# --------------------------------------------------------------------------------------------------
# Formatting helpers.


def _num(x: Any) -> float | None:
    """``x`` as a finite float, or None when it is missing, not a number, or NaN/inf."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _pct(x: Any) -> str:
    """A fraction as a percentage with two decimals (no % sign: the column header carries it)."""
    value = _num(x)
    return _MISSING if value is None else f"{100.0 * value:.2f}"


def _pvalue(p: float) -> str:
    # Three significant figures keep 0.0497 distinguishable from 0.05; tiny values are all "<0.001".
    return "p<0.001" if p < 0.001 else f"p={p:.3g}"


def _delta(vs: Any) -> str | None:
    """``+1.23 (p=0.004)`` in percentage points, bold when p < SIGNIFICANCE; None when not available."""
    if not isinstance(vs, Mapping):
        return None
    diff, p = _num(vs.get("diff")), _num(vs.get("p"))
    if diff is None:
        return None
    text = f"{100.0 * diff:+.2f}"
    if p is None:
        return text
    text = f"{text} ({_pvalue(p)})"
    return f"**{text}**" if p < SIGNIFICANCE else text


def _duration(seconds: Any) -> str:
    value = _num(seconds)
    if value is None:
        return _MISSING
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def _short(value: Any) -> str:
    """A hyper-parameter value, compactly: floats to 3 significant figures, containers as JSON."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _count(n: Any) -> str | None:
    """An example count with thousands separators (10,000 reads faster than 10000)."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else (None if n is None else str(n))


def _cell(text: Any) -> str:
    # A '|' inside a cell would split it into two columns; a newline would end the table.
    return str(text).replace("|", r"\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool]) -> str:
    """A GitHub-flavoured Markdown table; ``numeric`` columns are right-aligned."""
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if right else ":---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _test_accuracy(entry: Mapping[str, Any]) -> float | None:
    test = entry.get("test")
    return _num(test.get("accuracy")) if isinstance(test, Mapping) else _num(test)


def _test_loss(entry: Mapping[str, Any]) -> float | None:
    test = entry.get("test")
    return _num(test.get("loss")) if isinstance(test, Mapping) else None


def _vs_best(entry: Mapping[str, Any], which: str) -> Any:
    vs = entry.get("vs_best")
    return vs.get(which) if isinstance(vs, Mapping) else None


def _sorted_soups(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Soups in reading order; a stable sort, so the CLI's recipe order survives within each kind."""
    soups = list(results.get("soups") or [])
    return sorted(soups, key=lambda s: _KIND_ORDER.get(s.get("kind"), 2))


def _ingredient_names(results: Mapping[str, Any]) -> list[str]:
    return [str(ing.get("name", i)) for i, ing in enumerate(results.get("ingredients") or [])]


def _ingredient_label(ingredient: Any, names: Sequence[str]) -> str:
    """Progressions may name an ingredient by its index (recipes.py) or by name (the CLI)."""
    if ingredient is None:
        return _MISSING
    if isinstance(ingredient, int) and not isinstance(ingredient, bool) and 0 <= ingredient < len(names):
        return names[ingredient]
    return str(ingredient)


def _has_shifts(entries: Iterable[Mapping[str, Any]]) -> bool:
    return any(_num(e.get("shift_mean")) is not None or e.get("shifts") for e in entries)


def _shift_splits(results: Mapping[str, Any]) -> list[str]:
    """Shift split names: the declared order first, then any that only appear in the rows."""
    meta_splits = (results.get("meta") or {}).get("splits") or {}
    splits = [str(s) for s in (meta_splits.get("shifts") or [])]
    for entry in list(results.get("soups") or []) + list(results.get("ingredients") or []):
        for split in entry.get("shifts") or {}:
            if split not in splits:
                splits.append(split)
    return splits


# --------------------------------------------------------------------------------------------------
# The Markdown report.


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
        ("held-out examples", _count(splits.get("heldout"))),
        ("test examples", _count(splits.get("test"))),
        ("shift sets", ", ".join(splits.get("shifts") or []) or None),
        ("created", meta.get("created")),
    ]
    lines += [f"- {key}: {value}" for key, value in facts if value not in (None, "")]
    if meta.get("command"):
        lines += ["", "```", str(meta["command"]), "```"]
    return lines


def _reference(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The row the Δ columns compare against: the best ingredient, else the first soup."""
    soups = _sorted_soups(results)
    for soup in soups:
        if soup.get("kind") == "individual":
            return soup
    return soups[0] if soups else None


def _legend(results: Mapping[str, Any]) -> str:
    text = (
        "Δ: accuracy minus the best single ingredient's, in percentage points, on the same examples. "
        "p: two-sided exact McNemar test on the examples where the two disagree; "
        f"**bold** = p < {SIGNIFICANCE:g}."
    )
    n = _num(((results.get("meta") or {}).get("splits") or {}).get("test"))
    ref = _reference(results)
    acc = _test_accuracy(ref) if ref else None
    if n and n > 0 and acc is not None:
        se = 100.0 * stats.accuracy_standard_error(acc, int(n))
        text += (
            f" Noise level: a test accuracy of {100 * acc:.2f}% on n = {int(n):,} examples has a "
            f"binomial standard error of ±{se:.2f} points, so gaps under about {2 * se:.2f} points "
            "(2 SE) are within noise; the paired p is the sharper test."
        )
    return text


def _summary(soups: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line naming the best row on test (and on the shifts): the answer most readers look for."""
    lines = []
    for label, score, which in (
        ("test", _test_accuracy, "test"),
        ("shift mean", lambda s: _num(s.get("shift_mean")), "shift"),
    ):
        scored = [(score(s), s) for s in soups if score(s) is not None]
        if not scored:
            continue

        def describe(entry: Mapping[str, Any], value: float) -> str:
            delta = _delta(_vs_best(entry, which))
            return f"**{entry.get('name')}** ({100 * value:.2f}%" + (f", {delta} vs best ingredient)"
                                                                     if delta else ")")

        best_score, best = max(scored, key=lambda t: t[0])
        line = f"- Best on {label}: {describe(best, best_score)}"
        # An ensemble usually wins at K times the inference cost; name the best one-pass model too.
        single = [t for t in scored if t[1].get("forward_passes", 1) == 1]
        if best.get("forward_passes", 1) != 1 and single:
            one_score, one = max(single, key=lambda t: t[0])
            line += f"; with one forward pass: {describe(one, one_score)}"
        lines.append(line + ".")
    return lines


def _soup_section(results: Mapping[str, Any]) -> list[str]:
    soups = _sorted_soups(results)
    if not soups:
        return ["## Soups", "", "No soups were cooked."]
    shifts = _has_shifts(soups)
    headers = ["recipe", "ingredients", "forward passes", "held-out %", "test %", "Δ test vs best (p)"]
    numeric = [False, True, True, True, True, True]
    if shifts:
        headers += ["shift mean %", "Δ shift vs best (p)"]
        numeric += [True, True]
    headers.append("cook time")
    numeric.append(True)

    rows = []
    for soup in soups:
        # The reference row has no Δ by construction; say so rather than leave a blank.
        no_delta = "(reference)" if soup.get("kind") == "individual" else _MISSING
        row = [
            soup.get("name", "?"),
            soup.get("n_ingredients", _MISSING),
            soup.get("forward_passes", _MISSING),
            _pct(soup.get("heldout")),
            _pct(_test_accuracy(soup)),
            _delta(_vs_best(soup, "test")) or no_delta,
        ]
        if shifts:
            row += [_pct(soup.get("shift_mean")), _delta(_vs_best(soup, "shift")) or no_delta]
        row.append(_duration(soup.get("seconds")))
        rows.append(row)
    lines = ["## Soups", "", _table(headers, rows, numeric), "", _legend(results)]
    summary = _summary(soups)
    if summary:
        lines += [""] + summary
    return lines


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
        values = [_num(w) or 0.0 for w in weights]
        if all(v > 0 for v in values):
            continue
        for i, w in enumerate(values):
            if w > 0:
                chosen.setdefault(i, []).append(str(soup.get("name")))
    return chosen


def _ingredient_section(results: Mapping[str, Any]) -> list[str]:
    ingredients = list(results.get("ingredients") or [])
    if not ingredients:
        return []
    shifts = _has_shifts(ingredients)
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
                   key=lambda i: -(_num(ingredients[i].get("heldout")) or -math.inf))
    rows = []
    for i in order:
        ing = ingredients[i]
        loss = _test_loss(ing)
        row = [i, ing.get("name", i), _pct(ing.get("heldout")), _pct(_test_accuracy(ing)),
               _MISSING if loss is None else f"{loss:.4f}"]
        if shifts:
            row.append(_pct(ing.get("shift_mean")))
        if varying:
            hp = ing.get("hparams") or {}
            row.append(", ".join(f"{k}={_short(hp[k])}" for k in varying if k in hp) or _MISSING)
        if selectors:
            row.append(", ".join(selectors.get(i, [])) or _MISSING)
        row.append(f"`{ing['path']}`" if ing.get("path") else _MISSING)
        rows.append(row)
    lines = ["## Ingredients", "", _table(headers, rows, numeric)]
    if shared:
        common = ", ".join(f"{k}={_short(v)}" for k, v in shared.items())
        lines += ["", f"Shared by all ingredients: {common}"]
    return lines


def _progression_section(results: Mapping[str, Any]) -> list[str]:
    progressions = results.get("progressions") or {}
    names = _ingredient_names(results)
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
            row = [r.get("step", _MISSING), _ingredient_label(r.get("ingredient"), names),
                   r.get("action", _MISSING), r.get("n_ingredients", _MISSING), _pct(r.get("heldout"))]
            if has_soup:
                row.append(_pct(r.get("soup_heldout")))
            rows.append(row)
        lines += ["", f"## {recipe} soup: held-out accuracy with N ingredients", "",
                  _table(headers, rows, numeric)]
    return lines[1:] if lines else []


def _learned_section(results: Mapping[str, Any]) -> list[str]:
    history = results.get("learned_history") or {}
    rows = []
    for name, epochs in history.items():
        if not epochs:
            continue
        first, last = epochs[0], epochs[-1]
        scored = [(e.get("epoch", i), _num(e.get("heldout_accuracy"))) for i, e in enumerate(epochs)]
        scored = [(ep, acc) for ep, acc in scored if acc is not None]
        best = max(scored, key=lambda t: t[1]) if scored else None
        loss0, loss1 = _num(first.get("loss")), _num(last.get("loss"))
        rows.append([
            name,
            last.get("epoch", len(epochs) - 1),
            _MISSING if loss0 is None else f"{loss0:.4f}",
            _MISSING if loss1 is None else f"{loss1:.4f}",
            _pct(first.get("heldout_accuracy")),
            _pct(last.get("heldout_accuracy")),
            f"{100 * best[1]:.2f} (epoch {best[0]})" if best else _MISSING,
        ])
    if not rows:
        return []
    headers = ["learned soup", "epochs", "loss at start", "final loss", "held-out % at start",
               "final held-out %", "best held-out %"]
    return ["## Learned soups", "", _table(headers, rows, [False] + [True] * 6)]


def markdown_table(results: Mapping[str, Any]) -> str:
    """The Markdown report: soups, ingredients, greedy/pruned progressions and learned-soup curves.

    Args:
      results: the soup CLI's results dict (see the module docstring); accuracies are fractions.

    Returns:
      Markdown text. Accuracies are percentages with two decimals; Δ columns are percentage points
      against the best ingredient with the McNemar p-value, bold when p < ``SIGNIFICANCE``.
    """
    sections = [_header(results), _soup_section(results), _ingredient_section(results),
                _progression_section(results), _learned_section(results)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


# --------------------------------------------------------------------------------------------------
# Atomic files.


def _write_set(files: Mapping[str, tuple[Path, Callable[[Path], None]]]) -> dict[str, Path]:
    """Writes a report's files together (``files.write_files_atomic``): a failure while writing them,
    a full disk included, leaves the old report whole, never half old, half new."""
    soupjax_files.write_files_atomic({path: write for path, write in files.values()})
    return {key: path for key, (path, _) in files.items()}


def _text_writer(text: str) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def _json_text(data: Any) -> str:
    # Keys in the order they were built (meta first), as a reader of the report expects them.
    return soupjax_files.json_text(data, sort_keys=False)


def _csv_text(results: Mapping[str, Any]) -> str:
    fixed = ["type", "name", "n_ingredients", "heldout", "test_accuracy", "test_loss", "shift_mean"]
    # A shift split named like a fixed column would overwrite it; prefix only in that unlikely case.
    split_columns = [(s, f"shift_{s}" if s in fixed else s) for s in _shift_splits(results)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fixed + [column for _, column in split_columns])

    def value(x: Any) -> Any:
        number = _num(x)
        return "" if number is None else repr(number)  # repr: full precision, round-trips exactly.

    def row(kind: str, entry: Mapping[str, Any], n: Any) -> list[Any]:
        shifts = entry.get("shifts") or {}
        return [kind, entry.get("name", ""), "" if n is None else n, value(entry.get("heldout")),
                value(_test_accuracy(entry)), value(_test_loss(entry)), value(entry.get("shift_mean"))
                ] + [value(shifts.get(split)) for split, _ in split_columns]

    for soup in _sorted_soups(results):
        writer.writerow(row(str(soup.get("kind", "soup")), soup, soup.get("n_ingredients")))
    for ing in results.get("ingredients") or []:
        writer.writerow(row("ingredient", ing, 1))
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Plots.


def _figure(width: float, height: float) -> Any:
    """A figure on an Agg canvas: no pyplot, so no display and no global figure registry to leak into."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(path: Path, fig: Any) -> Path:
    # Called on a temporary name (see _write_set): the format is given, not guessed from the name.
    fig.savefig(path, format="png")
    return path


_MARKERS = ["*", "D", "s", "^", "v", "P", "X", "h", "p", "<", ">", "d"]


def _soup_styles(soups: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A distinct, stable marker and colour per soup, the same in every panel."""
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    styles: dict[str, dict[str, Any]] = {}
    k = 0
    for soup in soups:
        name = str(soup.get("name"))
        if name in styles:
            continue
        if soup.get("kind") == "individual":
            # A black ring around the ingredient's own grey dot: it is one of them, singled out.
            styles[name] = dict(marker="o", s=110, facecolors="none", edgecolors="black", linewidths=1.5)
        else:
            marker = _MARKERS[k % len(_MARKERS)]
            styles[name] = dict(marker=marker, s=150 if marker == "*" else 70,  # A star looks small.
                                color=colors[k % len(colors)], edgecolors="black", linewidths=0.5)
            k += 1
    return styles


def _scatter_png(path: Path, results: Mapping[str, Any]) -> Path:
    ingredients = list(results.get("ingredients") or [])
    soups = _sorted_soups(results)
    panels: list[tuple[str, Callable[[Mapping[str, Any]], float | None], str,
                       Callable[[Mapping[str, Any]], float | None], str]] = [
        ("held-out accuracy (%)", lambda e: _num(e.get("heldout")),
         "test accuracy (%)", _test_accuracy, "In distribution"),
    ]
    if _has_shifts(ingredients + soups):
        panels.append(("test accuracy (%)", _test_accuracy,
                       "mean accuracy on distribution shifts (%)", lambda e: _num(e.get("shift_mean")),
                       "Robustness (Figure 1 of Wortsman et al.)"))
    fig = _figure(5.2 * len(panels), 5.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = _soup_styles(soups)
    for ax, (xlabel, fx, ylabel, fy, title) in zip(axes, panels):
        pts = [(fx(e), fy(e)) for e in ingredients]
        pts = [(100 * x, 100 * y) for x, y in pts if x is not None and y is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, color="0.6", s=28, label="ingredients", zorder=2)
        for soup in soups:
            x, y = fx(soup), fy(soup)
            if x is None or y is None:
                continue
            name = str(soup.get("name"))
            ax.scatter([100 * x], [100 * y], label=name, zorder=3, **styles[name])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    # One legend for the figure: the same markers mean the same soups in both panels.
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), frameon=False)
    return _save_png(path, fig)


def _progression_points(records: Sequence[Mapping[str, Any]]) -> tuple[list, list, list, list]:
    """Splits a progression into the soup's path and the rejected candidates.

    Path: (ingredients in the soup, held-out accuracy of the soup) after each decision. A rejected
    candidate ('skip' in greedy, 'keep' in pruned) is plotted at the size it would have had (one more,
    resp. one fewer ingredient) and at its own held-out accuracy, so the plot shows why it was rejected.
    """
    path_x, path_y, rej_x, rej_y = [], [], [], []
    current = None
    for r in records:
        n, candidate = _num(r.get("n_ingredients")), _num(r.get("heldout"))
        action = r.get("action")
        rejected = action in ("skip", "keep")
        soup = _num(r.get("soup_heldout"))
        if soup is None:  # Older records: the candidate's accuracy is the soup's when it was accepted.
            soup = current if rejected and current is not None else candidate
        if n is not None and soup is not None:
            path_x.append(n)
            path_y.append(100 * soup)
        if rejected and n is not None and candidate is not None:
            rej_x.append(n + 1 if action == "skip" else n - 1)
            rej_y.append(100 * candidate)
        current = soup
    return path_x, path_y, rej_x, rej_y


def _greedy_png(path: Path, progressions: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colors = colormaps["tab10"].colors
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for i, (name, records) in enumerate(progressions.items()):
        path_x, path_y, rej_x, rej_y = _progression_points(records)
        color = colors[i % len(colors)]
        ax.plot(path_x, path_y, marker="o", color=color, label=f"{name} soup", zorder=3)
        if rej_x:
            ax.scatter(rej_x, rej_y, marker="x", color=color, alpha=0.6, zorder=2,
                       label=f"{name}: rejected candidates")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ingredients in the soup")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Held-out accuracy with N ingredients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_png(path, fig)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes report.md, report.json, report.csv, scatter.png and (with progressions) greedy.png.

    Args:
      results: the soup CLI's results dict.
      out_dir: directory to write into (created if missing).

    Returns:
      ``{'markdown', 'json', 'csv', 'scatter'[, 'greedy']: path}`` for the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": (out / "report.md", _text_writer(markdown_table(results))),
        "json": (out / "report.json", _text_writer(_json_text(results))),
        "csv": (out / "report.csv", _text_writer(_csv_text(results))),
        "scatter": (out / "scatter.png", lambda tmp: _scatter_png(tmp, results)),
    }
    progressions = {k: v for k, v in (results.get("progressions") or {}).items() if v}
    if progressions:
        files["greedy"] = (out / "greedy.png", lambda tmp: _greedy_png(tmp, progressions))
    return _write_set(files)


# --------------------------------------------------------------------------------------------------
# soup --recipe inspect.


def _matrix(names: Sequence[str], values: Sequence[Sequence[Any]], fmt: str) -> str:
    """A K x K matrix as a Markdown table, columns labelled by index to keep it narrow."""
    headers = [""] + [str(j) for j in range(len(names))]
    rows = []
    for i, name in enumerate(names):
        row = [f"{i} {name}"]
        for v in values[i]:
            number = _num(v)
            row.append(_MISSING if number is None else format(number, fmt))
        rows.append(row)
    return _table(headers, rows, [False] + [True] * len(names))


def inspect_table(inspect: Mapping[str, Any]) -> str:
    """Markdown for ``soup --recipe inspect``: angle and L2 matrices and interpolation curves.

    Args:
      inspect: ``{'names': [K], 'angles_deg': KxK, 'l2': KxK, 'interpolation': [{'a', 'b', 'alphas',
        'heldout'}]}``; angles are between the fine-tuning updates ``theta_i - theta_0``.

    Returns:
      Markdown text.
    """
    names = [str(n) for n in inspect.get("names") or []]
    lines = ["# Ingredient geometry", ""]
    if names and inspect.get("angles_deg"):
        lines += ["## Angle between fine-tuning updates θᵢ − θ₀ (degrees)", "",
                  "Near 0°: the two runs moved the same way; larger angles mean more diverse runs, which "
                  "the paper links to larger gains from averaging them.", "",
                  _matrix(names, inspect["angles_deg"], ".1f"), ""]
    if names and inspect.get("l2"):
        lines += ["## L2 distance between ingredients", "", _matrix(names, inspect["l2"], ".4g"), ""]
    curves = [c for c in inspect.get("interpolation") or [] if c.get("alphas")]
    if curves:
        lines += ["## Held-out accuracy along the line (1 − α)·a + α·b", ""]
        for c in curves:
            alphas, accs = list(c.get("alphas") or []), list(c.get("heldout") or [])
            headers = ["α"] + [f"{_num(a):.2f}" if _num(a) is not None else _MISSING for a in alphas]
            row = ["held-out %"] + [_pct(a) for a in accs]
            lines += [f"**{c.get('a')}** (α = 0) → **{c.get('b')}** (α = 1)", "",
                      _table(headers, [row], [False] + [True] * len(alphas))]
            # The soup hypothesis in one number: does some mixture beat both endpoints?
            values = [_num(a) for a in accs]
            if len(values) >= 2 and all(v is not None for v in values):
                best = max(range(len(values)), key=lambda i: values[i])
                gain = values[best] - max(values[0], values[-1])
                lines += ["", f"Best at α = {_num(alphas[best]):.2f}: {100 * values[best]:.2f}% "
                          f"({100 * gain:+.2f} points over the better endpoint)."]
            lines.append("")
    if len(lines) == 2:
        lines.append("Nothing to report.")
    return "\n".join(lines).rstrip() + "\n"


def _angles_png(path: Path, names: Sequence[str], angles: Sequence[Sequence[Any]]) -> Path:
    import numpy as np

    matrix = np.array([[_num(v) if _num(v) is not None else np.nan for v in row] for row in angles],
                      dtype=float)
    k = len(names)
    # Grow with K so labels fit, but cap it: a 70-ingredient sweep should not give a poster-sized PNG.
    side = min(max(4.5, 0.45 * k + 2.5), 14.0)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    finite = matrix[np.isfinite(matrix)]
    vmax = max(90.0, float(finite.max())) if finite.size else 90.0
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="angle (degrees)")
    labels = [n if len(n) <= 24 else n[:23] + "…" for n in names]
    tick_size = "medium" if k <= 12 else "x-small"
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=tick_size)
    ax.set_yticks(range(k), labels, fontsize=tick_size)
    if k <= 20:  # Beyond that the numbers are unreadable; the colour carries the information.
        for i in range(k):
            for j in range(k):
                v = matrix[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=10 if k <= 8 else 7,
                            color="black" if v > 0.6 * vmax else "white")
    ax.set_title("Angle between fine-tuning updates θᵢ − θ₀")
    return _save_png(path, fig)


def _interpolation_png(path: Path, curves: Sequence[Mapping[str, Any]]) -> Path:
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for c in curves:
        pts = [(_num(a), _num(h)) for a, h in zip(c.get("alphas") or [], c.get("heldout") or [])]
        pts = [(a, 100 * h) for a, h in pts if a is not None and h is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"{c.get('a')} → {c.get('b')}")
    ax.set_xlabel("α  (0 = a, 1 = b)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Held-out accuracy along (1 − α)·a + α·b")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    return _save_png(path, fig)


def write_inspect(inspect: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes inspect.md, inspect.json, angles.png and interpolation.png (the plots when there is data).

    Args:
      inspect: the dict described in ``inspect_table``.
      out_dir: directory to write into (created if missing).

    Returns:
      ``{'markdown', 'json'[, 'angles'][, 'interpolation']: path}`` for the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": (out / "inspect.md", _text_writer(inspect_table(inspect))),
        "json": (out / "inspect.json", _text_writer(_json_text(inspect))),
    }
    names = [str(n) for n in inspect.get("names") or []]
    if names and inspect.get("angles_deg"):
        files["angles"] = (out / "angles.png", lambda tmp: _angles_png(tmp, names, inspect["angles_deg"]))
    curves = [c for c in inspect.get("interpolation") or [] if c.get("alphas")]
    if curves:
        files["interpolation"] = (out / "interpolation.png", lambda tmp: _interpolation_png(tmp, curves))
    return _write_set(files)
