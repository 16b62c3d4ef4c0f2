"""The report's "## WiSE-FT" section: accuracy along (1 − α)·θ₀ + α·base for each base model, with the
α chosen on the held-out split marked.

Read with the plot ``wise_ft.png`` (``plots.wise_ft_png``): the table gives the numbers, the plot the
trade-off between in-distribution and shift accuracy that WiSE-FT is about.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from soupjax.report import fields
from soupjax.report.formatting import bold, pct, table


def _curve_table(curve: fields.WiseFtCurve) -> str:
    headers = ["α", "held-out %", "test %"]
    shifts = curve.has_shifts()
    if shifts:
        headers.append("shift mean %")
    rows = []
    for i, alpha in enumerate(curve.alphas):
        row = [f"{alpha:.2f}", pct(curve.heldout[i]), pct(curve.test[i])]
        if shifts:
            row.append(pct(curve.shift_mean[i]))
        rows.append([bold(c) for c in row] if i == curve.chosen else row)
    return table(headers, rows, [True] * len(headers))


def section(results: Mapping[str, Any]) -> list[str]:
    """The WiSE-FT section, one table per curve; nothing when the results have no curves."""
    curves = fields.wise_ft_curves(results)
    if not curves:
        return []
    lines = ["## WiSE-FT", "",
             "Weight-space interpolation between the shared initialisation θ₀ (α = 0) and a base model "
             "(α = 1): (1 − α)·θ₀ + α·base. **bold**: the α chosen on the held-out split. "
             "Plot: `wise_ft.png`."]
    for curve in curves:
        head = f"### {curve.name} (base: {curve.base})"
        if curve.chosen is not None:
            note = f"Chosen α = {curve.alphas[curve.chosen]:.2f}"
            if not curve.recorded:
                note += " (no choice recorded: the best held-out α)"
        elif curve.recorded:
            note = "The chosen α is not among the α evaluated"
        else:
            note = "No α was chosen"
        lines += ["", head, "", note + ".", "", _curve_table(curve)]
    return lines
