"""``soup --recipe inspect``: the geometry of the ingredients (angles and distances between their
fine-tuning updates, held-out accuracy along the line between two of them) as Markdown, JSON and plots.

``inspect_table`` writes the Markdown; ``write_inspect`` writes inspect.md, inspect.json, angles.png
and interpolation.png as one atomic set (see ``writing``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soupjax.report.figures import figure, save_png
from soupjax.report.formatting import MISSING, num, pct, table
from soupjax.report.writing import json_text, text_writer, write_set


def _matrix(names: Sequence[str], values: Sequence[Sequence[Any]], fmt: str) -> str:
    """A K x K matrix as a Markdown table, columns labelled by index to keep it narrow."""
    headers = [""] + [str(j) for j in range(len(names))]
    rows = []
    for i, name in enumerate(names):
        row = [f"{i} {name}"]
        for v in values[i]:
            number = num(v)
            row.append(MISSING if number is None else format(number, fmt))
        rows.append(row)
    return table(headers, rows, [False] + [True] * len(names))


def inspect_table(inspect: Mapping[str, Any]) -> str:
    """Markdown for ``soup --recipe inspect``: angle and L2 matrices and interpolation curves.

    Args:
      inspect: ``{'names': [K], 'angles_deg': KxK, 'l2': KxK, 'interpolation': [{'a', 'b', 'alphas',
        'heldout'}][, 'no_angles': why]}``; angles are between the fine-tuning updates ``theta_i - theta_0``
        (None, with ``no_angles`` saying why, when the ingredients share no start).

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
    elif names and inspect.get("no_angles"):
        lines += ["## Angle between fine-tuning updates θᵢ − θ₀", "",
                  f"Not given: {inspect['no_angles']}.", ""]
    if names and inspect.get("l2"):
        lines += ["## L2 distance between ingredients", "", _matrix(names, inspect["l2"], ".4g"), ""]
    curves = [c for c in inspect.get("interpolation") or [] if c.get("alphas")]
    if curves:
        lines += ["## Held-out accuracy along the line (1 − α)·a + α·b", ""]
        for c in curves:
            alphas, accs = list(c.get("alphas") or []), list(c.get("heldout") or [])
            headers = ["α"] + [f"{num(a):.2f}" if num(a) is not None else MISSING for a in alphas]
            row = ["held-out %"] + [pct(a) for a in accs]
            lines += [f"**{c.get('a')}** (α = 0) → **{c.get('b')}** (α = 1)", "",
                      table(headers, [row], [False] + [True] * len(alphas))]
            # The soup hypothesis in one number: does some mixture beat both endpoints?
            values = [num(a) for a in accs]
            if len(values) >= 2 and all(v is not None for v in values):
                best = max(range(len(values)), key=lambda i: values[i])
                gain = values[best] - max(values[0], values[-1])
                lines += ["", f"Best at α = {num(alphas[best]):.2f}: {100 * values[best]:.2f}% "
                          f"({100 * gain:+.2f} points over the better endpoint)."]
            lines.append("")
    if len(lines) == 2:
        lines.append("Nothing to report.")
    return "\n".join(lines).rstrip() + "\n"


def _angles_png(path: Path, names: Sequence[str], angles: Sequence[Sequence[Any]]) -> Path:
    import numpy as np

    matrix = np.array([[num(v) if num(v) is not None else np.nan for v in row] for row in angles],
                      dtype=float)
    k = len(names)
    # Grow with K so labels fit, but cap it: a 70-ingredient sweep should not give a poster-sized PNG.
    side = min(max(4.5, 0.45 * k + 2.5), 14.0)
    fig = figure(side + 1.0, side)
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
    return save_png(path, fig)


def _interpolation_png(path: Path, curves: Sequence[Mapping[str, Any]]) -> Path:
    fig = figure(6.5, 4.5)
    ax = fig.subplots()
    for c in curves:
        pts = [(num(a), num(h)) for a, h in zip(c.get("alphas") or [], c.get("heldout") or [])]
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
    return save_png(path, fig)


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
        "markdown": (out / "inspect.md", text_writer(inspect_table(inspect))),
        "json": (out / "inspect.json", text_writer(json_text(inspect))),
    }
    names = [str(n) for n in inspect.get("names") or []]
    if names and inspect.get("angles_deg"):
        files["angles"] = (out / "angles.png", lambda tmp: _angles_png(tmp, names, inspect["angles_deg"]))
    curves = [c for c in inspect.get("interpolation") or [] if c.get("alphas")]
    if curves:
        files["interpolation"] = (out / "interpolation.png", lambda tmp: _interpolation_png(tmp, curves))
    return write_set(files)
