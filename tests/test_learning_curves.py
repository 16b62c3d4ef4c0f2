"""The learning-curve table and plot: where the rule fired, the last epoch's gain, capped runs named."""
from __future__ import annotations

import math

from soupjax.report import learning_curves


def _meta(name, curve, steps, decay_start, every=50, max_epochs=4.0, heldout=0.9):
    return {"name": name, "hparams": {"learning_rate": 1e-4, "seed": 3}, "heldout_curve": curve, "steps": steps,
            "decay_start": decay_start, "metrics": {"heldout": {"accuracy": heldout}},
            "config": {"eval_every_steps": every, "num_epochs": max_epochs}}


def test_a_run_where_the_rule_fired():
    curve = [[50, 0.80], [100, 0.85], [150, 0.86], [200, 0.861], [250, 0.862]]
    row = learning_curves.describe(_meta("a", curve, 300, 250), steps_per_epoch=100)
    assert row["levelled_off_epoch"] == 2.5
    assert row["epochs"] == 3.0
    # One epoch = two evaluations: the last (0.862) against the best before the previous one (0.86).
    assert math.isclose(row["last_epoch_gain"], 0.002)
    table = learning_curves.markdown([row])
    assert "| a | learning_rate=0.0001 | 2.5 | 3.0 (4) | +0.20 | 90.00 |" in table
    assert "seed" not in table  # the data order is not a hyperparameter worth a column


def test_a_capped_run_counts_its_whole_curve_and_says_so():
    curve = [[50, 0.80], [100, 0.82], [150, 0.84], [200, 0.86]]
    row = learning_curves.describe(_meta("b", curve, 400, None), steps_per_epoch=100)
    assert row["levelled_off_epoch"] is None
    assert math.isclose(row["last_epoch_gain"], 0.04)
    assert "never (capped)" in learning_curves.markdown([row])


def test_plot_is_written(tmp_path):
    rows = [dict(learning_curves.describe(_meta("upstream", [[50, 0.5], [100, 0.6]], 150, 100), 100), name="upstream"),
            learning_curves.describe(_meta("c", [[50, 0.8], [100, 0.81]], 200, None), 100)]
    path = learning_curves.plot(rows, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
