"""The report's main section: every cooked row ranked against the best ingredient, its legend and the
one-line answer (which row did best on test and on the shifts).

Optional columns (shift accuracies, kind, held-out evaluations, peak memory, chosen hyperparameters)
appear only when some row has the field, so the results of an older run render as they always did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from soupjax.report import fields, stats
from soupjax.report.formatting import (MISSING, SIGNIFICANCE, delta, duration, integer, mebibytes, num,
                                       options, pct, table)

# What each kind of row is, for the legend. "merge" is the one a reader of the paper does not know.
KINDS = {
    "individual": "one fine-tuned model (the reference)",
    "soup": "a weighted average of the ingredients' weights, one forward pass",
    "merge": "one model built from the ingredients' displacements from the shared initialisation "
             "(θᵢ − θ₀, combined and added back to θ₀), one forward pass",
    "ensemble": "the average of K models' outputs, K forward passes per image",
}
# Kinds an older results dict already had; a "kind" column is only worth its width once others appear.
_OLD_KINDS = {"individual", "soup", "ensemble"}


def _show_kind(soups: Sequence[Mapping[str, Any]]) -> bool:
    return (fields.has_field(soups, "method")
            or any(s.get("kind") is not None and s.get("kind") not in _OLD_KINDS for s in soups))


def legend(results: Mapping[str, Any]) -> str:
    """What Δ and p mean, and how large a gap the test set can resolve."""
    text = (
        "Δ: accuracy minus the best single ingredient's, in percentage points, on the same examples. "
        "p: two-sided exact McNemar test on the examples where the two disagree; "
        f"**bold** = p < {SIGNIFICANCE:g}."
    )
    n = num(((results.get("meta") or {}).get("splits") or {}).get("test"))
    ref = fields.reference(results)
    acc = fields.test_accuracy(ref) if ref else None
    if n and n > 0 and acc is not None:
        se = 100.0 * stats.accuracy_standard_error(acc, int(n))
        text += (
            f" Noise level: a test accuracy of {100 * acc:.2f}% on n = {int(n):,} examples has a "
            f"binomial standard error of ±{se:.2f} points, so gaps under about {2 * se:.2f} points "
            "(2 SE) are within noise; the paired p is the sharper test."
        )
    return text


def _kinds_legend(soups: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per kind present, in the order of ``KINDS``."""
    present = {s.get("kind") for s in soups}
    return [f"- {kind}: {meaning}." for kind, meaning in KINDS.items() if kind in present]


def _methods_legend(results: Mapping[str, Any], soups: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per method of ``results['methods']``, naming the rows it cooked when the rows say."""
    methods = results.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        return []
    lines = ["Methods:", ""]
    for name, summary in methods.items():
        rows = [str(s.get("name")) for s in soups if s.get("method") == name]
        # Name the rows only when they differ from the method's name (learned -> learned_global, ...).
        cooked = f" ({', '.join(rows)})" if rows and rows != [str(name)] else ""
        text = str(summary).strip() if summary else MISSING
        lines.append(f"- `{name}`{cooked}: {text}")
    return lines


def summary(soups: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line naming the best row on test (and on the shifts): the answer most readers look for."""
    lines = []
    scores: list[tuple[str, Callable[[Mapping[str, Any]], float | None], str]] = [
        ("test", fields.test_accuracy, "test"),
        ("shift mean", lambda s: num(s.get("shift_mean")), "shift"),
    ]
    for label, score, which in scores:
        scored = [(score(s), s) for s in soups if score(s) is not None]
        if not scored:
            continue

        def describe(entry: Mapping[str, Any], value: float) -> str:
            gain = delta(fields.vs_best(entry, which))
            return f"**{entry.get('name')}** ({100 * value:.2f}%" + (f", {gain} vs best ingredient)"
                                                                     if gain else ")")

        best_score, best = max(scored, key=lambda t: t[0])
        line = f"- Best on {label}: {describe(best, best_score)}"
        # An ensemble usually wins at K times the inference cost; name the best one-pass model too.
        single = [t for t in scored if t[1].get("forward_passes", 1) == 1]
        if best.get("forward_passes", 1) != 1 and single:
            one_score, one = max(single, key=lambda t: t[0])
            line += f"; with one forward pass: {describe(one, one_score)}"
        lines.append(line + ".")
    return lines


def section(results: Mapping[str, Any]) -> list[str]:
    """The "## Soups" section: the ranked table, its legend and the best rows."""
    soups = fields.ranked_soups(results)
    if not soups:
        return ["## Soups", "", "No soups were cooked."]
    is_reference = fields.is_reference(soups)
    shifts = fields.has_shifts(soups)
    show_kind = _show_kind(soups)
    show_evals = fields.has_field(soups, "heldout_evals")
    show_memory = fields.has_field(soups, "peak_memory_mb")
    show_chosen = any(options(s.get("chosen")) != MISSING for s in soups)

    headers = ["recipe"] + (["kind"] if show_kind else []) + [
        "ingredients", "forward passes", "held-out %", "test %", "Δ test vs best (p)"]
    numeric = [False] + ([False] if show_kind else []) + [True] * 5
    if shifts:
        headers += ["shift mean %", "Δ shift vs best (p)"]
        numeric += [True, True]
    headers.append("cook time")
    numeric.append(True)
    # The costs of choosing on held-out, after the cook time they explain.
    for shown, header, right in ((show_evals, "held-out evals", True), (show_memory, "peak memory", True),
                                 (show_chosen, "chosen", False)):
        if shown:
            headers.append(header)
            numeric.append(right)

    rows = []
    for soup in soups:
        # The reference row has no Δ by construction; say so rather than leave a blank.
        no_delta = "(reference)" if is_reference(soup) else MISSING
        row = [soup.get("name", "?")]
        if show_kind:
            row.append(soup.get("kind") or MISSING)
        row += [
            soup.get("n_ingredients", MISSING),
            soup.get("forward_passes", MISSING),
            pct(soup.get("heldout")),
            pct(fields.test_accuracy(soup)),
            delta(fields.vs_best(soup, "test")) or no_delta,
        ]
        if shifts:
            row += [pct(soup.get("shift_mean")), delta(fields.vs_best(soup, "shift")) or no_delta]
        row.append(duration(soup.get("seconds")))
        if show_evals:
            row.append(integer(soup.get("heldout_evals")))
        if show_memory:
            row.append(mebibytes(soup.get("peak_memory_mb")))
        if show_chosen:
            row.append(options(soup.get("chosen")))
        rows.append(row)

    text = legend(results) + " Rows: the reference first, then by test accuracy, best first."
    if show_evals or show_memory or show_chosen:
        text += (" held-out evals: evaluations of candidate models on the held-out split it took to cook "
                 "the row; peak memory: the most extra host memory cooking it used; chosen: the "
                 "hyperparameters it picked on the held-out split.")
    lines = ["## Soups", "", table(headers, rows, numeric), "", text]
    if show_kind:
        lines += ["", "Kinds:", ""] + _kinds_legend(soups)
    methods = _methods_legend(results, soups)
    if methods:
        lines += [""] + methods
    best = summary(soups)
    if best:
        lines += [""] + best
    return lines
