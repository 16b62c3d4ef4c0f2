"""Matplotlib figures without pyplot: every PNG soupjax draws (report, inspect, learning curves) is made
on its own Agg canvas, so nothing needs a screen and no global backend or figure registry is touched.

matplotlib is imported inside the functions: the report's text never needs it, and importing it costs
about a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def figure(width: float, height: float) -> Any:
    """A figure of ``width`` x ``height`` inches on an Agg canvas, laid out with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(path: Path, fig: Any) -> Path:
    """Saves ``fig`` as a PNG at ``path`` and returns ``path``."""
    # Called on a temporary name (see writing.write_set): the format is given, not guessed from the name.
    fig.savefig(path, format="png")
    return path
