"""The soup report's PNG plots:

* ``scatter.png``  the paper's Figure 1 (held-out vs test, test vs mean shift accuracy),
* ``greedy.png``   held-out accuracy against the number of ingredients (greedy and pruned soups),
* ``wise_ft.png``  test and mean shift accuracy against WiSE-FT's α, the held-out choice marked.

Each function draws one file at the path it is given (a temporary name: see ``writing``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from soupjax.report import fields
from soupjax.report.figures import figure, save_png
from soupjax.report.formatting import num

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


def scatter_png(path: Path, results: Mapping[str, Any]) -> Path:
    """Held-out vs test accuracy of every ingredient and soup and, with shift sets, test vs shift."""
    ingredients = list(results.get("ingredients") or [])
    soups = fields.ranked_soups(results)
    panels: list[tuple[str, Callable[[Mapping[str, Any]], float | None], str,
                       Callable[[Mapping[str, Any]], float | None], str]] = [
        ("held-out accuracy (%)", lambda e: num(e.get("heldout")),
         "test accuracy (%)", fields.test_accuracy, "In distribution"),
    ]
    if fields.has_shifts(ingredients + soups):
        panels.append(("test accuracy (%)", fields.test_accuracy,
                       "mean accuracy on distribution shifts (%)", lambda e: num(e.get("shift_mean")),
                       "Robustness (Figure 1 of Wortsman et al.)"))
    fig = figure(5.2 * len(panels), 5.0)
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
        _label_panel(ax, xlabel, ylabel, title)
    # One legend for the figure: the same markers mean the same soups in both panels.
    _figure_legend(fig, axes[0], columns=5)
    return save_png(path, fig)


def _label_panel(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title and grid; 'no data' written on a panel left empty."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if not ax.has_data():
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _figure_legend(fig: Any, ax: Any, *, columns: int, **kw: Any) -> None:
    """One legend under the figure, from the first panel (every panel draws the same series)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), columns), frameon=False, **kw)


def _progression_points(records: Sequence[Mapping[str, Any]]) -> tuple[list, list, list, list]:
    """Splits a progression into the soup's path and the rejected candidates.

    Path: (ingredients in the soup, held-out accuracy of the soup) after each decision. A rejected
    candidate ('skip' in greedy, 'keep' in pruned) is plotted at the size it would have had (one more,
    resp. one fewer ingredient) and at its own held-out accuracy, so the plot shows why it was rejected.
    """
    path_x, path_y, rej_x, rej_y = [], [], [], []
    current = None
    for r in records:
        n, candidate = num(r.get("n_ingredients")), num(r.get("heldout"))
        action = r.get("action")
        rejected = action in ("skip", "keep")
        soup = num(r.get("soup_heldout"))
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


def greedy_png(path: Path, progressions: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Held-out accuracy of each progression's soup against its size, rejected candidates as crosses."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colors = colormaps["tab10"].colors
    fig = figure(6.5, 4.5)
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
    return save_png(path, fig)


def wise_ft_drawable(curves: Sequence[fields.WiseFtCurve]) -> bool:
    """Whether ``wise_ft_png`` has anything to draw: some α with a test or shift accuracy."""
    return any(v is not None for c in curves for v in c.test + c.shift_mean)


def wise_ft_png(path: Path, curves: Sequence[fields.WiseFtCurve]) -> Path:
    """Test (and, with shift sets, mean shift) accuracy against α, one line per base model; a star marks
    the α chosen on the held-out split."""
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    panels = [("test accuracy (%)", lambda c: c.test, "In distribution")]
    if any(c.has_shifts() for c in curves):
        panels.append(("mean accuracy on distribution shifts (%)", lambda c: c.shift_mean, "Robustness"))
    fig = figure(5.2 * len(panels), 4.5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, values, title) in zip(axes, panels):
        for i, curve in enumerate(curves):
            color = colors[i % len(colors)]
            pts = [(a, 100 * v) for a, v in zip(curve.alphas, values(curve)) if v is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=4, color=color, label=f"{curve.name} (base: {curve.base})")
            chosen = curve.chosen
            if chosen is not None and values(curve)[chosen] is not None:
                ax.plot([curve.alphas[chosen]], [100 * values(curve)[chosen]], marker="*", ms=16,
                        color=color, markeredgecolor="black", linestyle="none", zorder=3,
                        label=f"{curve.name}: α chosen on held-out")
        _label_panel(ax, "α  (0 = θ₀, 1 = base)", ylabel, title)
    _figure_legend(fig, axes[0], columns=2, fontsize="small")
    fig.suptitle("WiSE-FT: (1 − α)·θ₀ + α·base")
    return save_png(path, fig)
