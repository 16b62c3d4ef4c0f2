"""The soup report: Markdown, JSON and CSV tables and PNG plots of what ``soup`` cooked.

The soup CLI gathers one ``results`` dict (meta data, per-ingredient metrics, per-soup metrics with a
paired McNemar comparison against the best ingredient, greedy/pruned progressions, learned-soup
training curves, the hyperparameter grids methods searched on the held-out split and WiSE-FT curves;
all accuracies are fractions) and hands it to ``write_report``, which writes

* ``report.md``   the tables a user reads (``markdown_table``),
* ``report.json`` the results exactly as given, for scripts,
* ``report.csv``  one row per soup and per ingredient, for spreadsheets,
* ``scatter.png`` the paper's Figure 1 (held-out vs test, test vs mean shift accuracy),
* ``greedy.png``  held-out accuracy against the number of ingredients (greedy and pruned soups),
* ``wise_ft.png`` test and shift accuracy against WiSE-FT's mixing coefficient α.

A row of ``results['soups']`` has ``name``, ``kind`` ('individual', 'soup', 'merge': built from the
displacements θᵢ − θ₀ from the shared initialisation, or 'ensemble': K forward passes),
``n_ingredients``, ``forward_passes``, ``heldout``, ``test`` ``{accuracy, loss}``, ``shifts``,
``shift_mean``, ``seconds``, ``path``, ``weights`` and ``vs_best``, and optionally ``method`` (the
registry name that cooked it), ``heldout_evals``, ``peak_memory_mb`` (MiB) and ``chosen`` (the
hyperparameters picked on the held-out split). Optional top-level keys: ``progressions``,
``learned_history``, ``grids`` (``{row: [{'options', 'heldout'}]}``), ``wise_ft`` (``{row: {'base',
'alphas', 'heldout', 'test', 'shift_mean', 'chosen_alpha'}}``) and ``methods`` (``{method: summary}``).

``soup --recipe inspect`` measures the geometry of the ingredients (angles and distances between their
fine-tuning updates, held-out accuracy along the line between two of them); ``inspect_table`` and
``write_inspect`` report that.

Every field except the top-level keys is optional: a run without shift sets, progressions, learned
soups or the newer methods gives a report without those columns and sections rather than an error.

The modules, one part each: ``formatting`` (how a value is written), ``fields`` (reading rows, the
ranking), ``markdown`` with ``soups_table``, ``ingredients_table``, ``selection`` and ``wise_ft`` (the
sections of report.md), ``tabular`` (the CSV), ``figures`` and ``plots`` (the PNGs), ``writing`` (the
atomic set of files) and ``inspect``.
"""

from __future__ import annotations

from soupjax.report.formatting import SIGNIFICANCE
from soupjax.report.inspect import inspect_table, write_inspect
from soupjax.report.markdown import markdown_table
from soupjax.report.writing import write_report


__all__ = ["SIGNIFICANCE", "markdown_table", "write_report", "inspect_table", "write_inspect"]
