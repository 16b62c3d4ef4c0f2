"""How the report writes a value: numbers, percentages, p-values, durations, memory, hyperparameters and
Markdown table cells and tables.

Every formatter here takes whatever a results dict holds (a float, an int, None, a string, NaN) and
returns text; a value that is missing or not a finite number becomes ``MISSING`` rather than an error,
so one odd field never costs the whole report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# p-values below this are shown in bold. A conventional threshold: the point is to make a reader look
# twice before believing a 0.1-point gain, not to run a formal multiple-comparison procedure.
SIGNIFICANCE = 0.05

# What a cell shows for a field that is missing or not a number.
MISSING = "–"


def num(x: Any) -> float | None:
    """``x`` as a finite float, or None when it is missing, not a number, or NaN/inf."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def pct(x: Any) -> str:
    """A fraction as a percentage with two decimals (no % sign: the column header carries it)."""
    value = num(x)
    return MISSING if value is None else f"{100.0 * value:.2f}"


def pvalue(p: float) -> str:
    """``p=0.0497``; three significant figures keep it distinguishable from 0.05, tiny ones are ``p<0.001``."""
    return "p<0.001" if p < 0.001 else f"p={p:.3g}"


def delta(vs: Any) -> str | None:
    """``+1.23 (p=0.004)`` in percentage points, bold when p < SIGNIFICANCE; None when not available.

    Args:
      vs: a paired comparison ``{'diff': fraction, 'p': p-value, ...}`` (``vs_best['test']``).
    """
    if not isinstance(vs, Mapping):
        return None
    diff, p = num(vs.get("diff")), num(vs.get("p"))
    if diff is None:
        return None
    text = f"{100.0 * diff:+.2f}"
    if p is None:
        return text
    text = f"{text} ({pvalue(p)})"
    return f"**{text}**" if p < SIGNIFICANCE else text


def duration(seconds: Any) -> str:
    """Seconds in the unit a reader thinks in: ``12.5 s``, ``3.2 min``, ``1.50 h``."""
    value = num(seconds)
    if value is None:
        return MISSING
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def mebibytes(mb: Any) -> str:
    """A memory size given in MiB as ``1,234.5 MiB``.

    Always MiB, never switched to GiB: the column compares methods, which is easiest in one unit.
    """
    value = num(mb)
    return MISSING if value is None else f"{value:,.1f} MiB"


def short(value: Any) -> str:
    """A hyper-parameter value, compactly: floats to 3 significant figures, containers as JSON."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def options(values: Any) -> str:
    """Hyperparameters as ``density=0.2, lambda=1``; MISSING for None or an empty dict."""
    if not isinstance(values, Mapping) or not values:
        return MISSING
    return ", ".join(f"{key}={short(value)}" for key, value in values.items())


def count(n: Any) -> str | None:
    """An example count with thousands separators (10,000 reads faster than 10000)."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else (None if n is None else str(n))


def integer(n: Any) -> str:
    """A count such as the number of held-out evaluations; MISSING when it is not a number."""
    value = num(n)
    return MISSING if value is None else f"{value:,.0f}"


def bold(text: Any) -> str:
    """``**text**``, except for MISSING: a bold dash reads as a value."""
    text = str(text)
    return text if text in ("", MISSING) else f"**{text}**"


def cell(text: Any) -> str:
    """Text made safe for one Markdown table cell."""
    # A '|' inside a cell would split it into two columns; a newline would end the table.
    return str(text).replace("|", r"\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool]) -> str:
    """A GitHub-flavoured Markdown table; ``numeric`` columns are right-aligned."""
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if right else ":---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
