"""Writing a report's set of files together, atomically (``soupjax.io.files.write_files_atomic``), and
``write_report``, the soup report's set.

Every file is written under a temporary name in the output directory and renamed into place only once
all of them were written, so a crash or a full disk never leaves a half-written report that looks
complete, nor one whose Markdown and plots come from different runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from soupjax.io import files as soupjax_files  # `files` is the name of a report's set of files below
from soupjax.report import fields, plots, tabular
from soupjax.report.markdown import markdown_table

Writer = Callable[[Path], Any]


def write_set(files: Mapping[str, tuple[Path, Writer]]) -> dict[str, Path]:
    """Writes ``{key: (path, write)}`` together: a failure while writing them, a full disk included,
    leaves the old files whole, never half old, half new. Returns ``{key: path}``."""
    soupjax_files.write_files_atomic({path: write for path, write in files.values()})
    return {key: path for key, (path, _) in files.items()}


def text_writer(text: str) -> Writer:
    """A writer that puts ``text`` (UTF-8) in the file it is given."""
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def json_text(data: Any) -> str:
    """``data`` as the JSON text of a report file."""
    # Keys in the order they were built (meta first), as a reader of the report expects them.
    return soupjax_files.json_text(data, sort_keys=False)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes report.md, report.json, report.csv, scatter.png and, when there is data for them,
    greedy.png (progressions) and wise_ft.png (WiSE-FT curves).

    Args:
      results: the soup CLI's results dict.
      out_dir: directory to write into (created if missing).

    Returns:
      ``{'markdown', 'json', 'csv', 'scatter'[, 'greedy'][, 'wise_ft']: path}`` for the files written.
    """
    out = soupjax_files.as_path(out_dir)  # a gs:// URL stays one
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, Writer]] = {
        "markdown": (out / "report.md", text_writer(markdown_table(results))),
        "json": (out / "report.json", text_writer(json_text(results))),
        "csv": (out / "report.csv", text_writer(tabular.csv_text(results))),
        "scatter": (out / "scatter.png", lambda tmp: plots.scatter_png(tmp, results)),
    }
    progressions = {k: v for k, v in (results.get("progressions") or {}).items() if v}
    if progressions:
        files["greedy"] = (out / "greedy.png", lambda tmp: plots.greedy_png(tmp, progressions))
    curves = fields.wise_ft_curves(results)
    if plots.wise_ft_drawable(curves):
        files["wise_ft"] = (out / "wise_ft.png", lambda tmp: plots.wise_ft_png(tmp, curves))
    return write_set(files)
