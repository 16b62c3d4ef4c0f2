"""The soup report and its statistics: McNemar by hand, the Markdown a user reads, the files on disk."""

from __future__ import annotations

import copy
import csv
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from soupjax import files, report, stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# stats


def _paired(both: int, b_only: int, a_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [0] * b_only + [1] * a_only + [0] * neither)
    b = np.array([1] * both + [1] * b_only + [0] * a_only + [0] * neither)
    return a, b


def test_mcnemar_matches_hand_computation():
    a, b = _paired(both=70, b_only=10, a_only=2, neither=18)
    result = stats.mcnemar(a, b)
    assert (result.n, result.b_only, result.a_only) == (100, 10, 2)
    assert result.diff == pytest.approx(0.08)  # acc_b - acc_a = 0.80 - 0.72
    # Exact two-sided binomial on 12 discordant pairs: 2 * P(X <= 2), X ~ Bin(12, 1/2).
    hand = 2 * sum(comb(12, k) for k in range(3)) / 2**12
    assert result.p == pytest.approx(hand)
    assert result.p == pytest.approx(scipy_stats.binomtest(2, 12).pvalue)
    # Symmetric: swapping the models flips the sign of diff, not the p-value.
    swapped = stats.mcnemar(b, a)
    assert swapped.diff == pytest.approx(-0.08) and swapped.p == pytest.approx(result.p)
    assert result.as_dict()["p"] == result.p


def test_mcnemar_identical_and_bool_inputs():
    a = np.array([True, False, True, True])
    result = stats.mcnemar(a, a.copy())
    assert result.p == 1.0 and result.diff == 0.0 and result.n == 4


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match=r"3.*4"):
        stats.mcnemar(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar(np.array([0.2, 0.9]), np.array([1, 0]))
    with pytest.raises(ValueError):
        stats.mcnemar(np.array([]), np.array([]))


def test_accuracy_standard_error():
    assert stats.accuracy_standard_error(0.9, 100) == pytest.approx(0.03)
    assert stats.accuracy_standard_error(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        stats.accuracy_standard_error(0.5, 0)


# --------------------------------------------------------------------------------------------------
# A results dict as the soup CLI builds it.


def _ingredient(name: str, heldout: float, test: float, shifts: dict[str, float], lr: float) -> dict:
    return {
        "name": name, "path": f"/runs/ing/{name}", "heldout": heldout,
        "test": {"accuracy": test, "loss": 0.5}, "shifts": shifts,
        "shift_mean": sum(shifts.values()) / len(shifts), "hparams": {"lr": lr, "epochs": 10},
    }


def _soup(name, kind, k, passes, heldout, test, shifts, vs_best, weights=None) -> dict:
    return {
        "name": name, "kind": kind, "n_ingredients": k, "forward_passes": passes, "heldout": heldout,
        "test": {"accuracy": test, "loss": 0.4}, "shifts": shifts,
        "shift_mean": sum(shifts.values()) / len(shifts), "seconds": 12.5, "path": None,
        "weights": weights, "vs_best": vs_best,
    }


@pytest.fixture
def results() -> dict:
    ingredients = [
        _ingredient("ing_lr3e-5", 0.8100, 0.8050, {"rot": 0.60, "noise": 0.50}, 3e-5),
        _ingredient("ing_lr1e-4", 0.8200, 0.8123, {"rot": 0.62, "noise": 0.52}, 1e-4),
        _ingredient("ing_lr3e-4", 0.7900, 0.7800, {"rot": 0.55, "noise": 0.45}, 3e-4),
    ]
    sig = {"test": {"diff": 0.012, "p": 0.003, "n": 10000},
           "shift": {"diff": 0.02, "p": 0.0004, "n": 20000}}
    not_sig = {"test": {"diff": -0.001, "p": 0.62, "n": 10000}, "shift": {"diff": 0.001, "p": 0.5, "n": 20000}}
    soups = [
        # Deliberately out of reading order: the table must put the best ingredient first, ensemble last.
        _soup("ensemble", "ensemble", 3, 3, 0.83, 0.8300, {"rot": 0.64, "noise": 0.54}, sig),
        _soup("uniform", "soup", 3, 1, 0.815, 0.8113, {"rot": 0.63, "noise": 0.52}, not_sig,
              [1 / 3] * 3),
        _soup("greedy", "soup", 2, 1, 0.825, 0.8243, {"rot": 0.645, "noise": 0.535}, sig, [0.5, 0.5, 0.0]),
        _soup("best_ingredient", "individual", 1, 1, 0.82, 0.8123, {"rot": 0.62, "noise": 0.52}, None),
    ]
    return {
        "meta": {"ingredients_dir": "/runs/ing", "recipes": ["uniform", "greedy", "ensemble"],
                 "dataset": "fashion_mnist", "model": "vit_testing",
                 "splits": {"heldout": 1200, "test": 10000, "shifts": ["rot", "noise"]},
                 "created": "2025-01-01T00:00:00", "command": "python -m soupjax.soup --recipe all"},
        "ingredients": ingredients,
        "soups": soups,
        "progressions": {
            "greedy": [
                {"step": 0, "ingredient": 1, "action": "add", "heldout": 0.82, "n_ingredients": 1,
                 "soup_heldout": 0.82},
                {"step": 1, "ingredient": 0, "action": "add", "heldout": 0.825, "n_ingredients": 2,
                 "soup_heldout": 0.825},
                {"step": 2, "ingredient": "ing_lr3e-4", "action": "skip", "heldout": 0.80,
                 "n_ingredients": 2},
            ],
            "pruned": [],
        },
        "learned_history": {
            "learned_global": [{"epoch": 0, "loss": 0.61, "heldout_accuracy": 0.815},
                               {"epoch": 1, "loss": 0.55, "heldout_accuracy": 0.8277},
                               {"epoch": 2, "loss": 0.52, "heldout_accuracy": 0.8266}],
        },
    }


def _strip_extras(results: dict) -> dict:
    """The same run with no shift sets, progressions or learned soups."""
    bare = copy.deepcopy(results)
    bare["meta"]["splits"]["shifts"] = []
    for entry in bare["ingredients"] + bare["soups"]:
        entry["shifts"], entry["shift_mean"] = {}, None
        if entry.get("vs_best"):
            entry["vs_best"]["shift"] = None
    del bare["progressions"]
    bare["learned_history"] = {}
    return bare


# --------------------------------------------------------------------------------------------------
# Markdown


def test_markdown_table_reads_well(results):
    text = report.markdown_table(results)
    for entry in results["soups"] + results["ingredients"]:
        assert entry["name"] in text
    soup_table = text.split("## Soups")[1].split("##")[0]
    # Reading order: reference first, soups in the CLI's order, the K-pass ensemble last.
    order = [soup_table.index(f"| {name} |") for name in ("best_ingredient", "uniform", "greedy", "ensemble")]
    assert order == sorted(order)
    # Percentages with two decimals, Δ in points, significance in bold, the rest not.
    assert "| 82.43 |" in soup_table and "| 81.23 |" in soup_table
    assert "**+1.20 (p=0.003)**" in soup_table
    assert "**+2.00 (p<0.001)**" in soup_table
    assert "-0.10 (p=0.62)" in soup_table and "**-0.10" not in soup_table
    assert "(reference)" in soup_table
    # The legend gives the noise level at n = 10,000: sqrt(.8123 * .1877 / 10000) = 0.39 points.
    assert "±0.39 points" in text
    # Ingredients: best held-out first, varying hparams shown, shared ones once, selection by greedy.
    ing_table = text.split("## Ingredients")[1].split("##")[0]
    assert ing_table.index("ing_lr1e-4") < ing_table.index("ing_lr3e-5") < ing_table.index("ing_lr3e-4")
    assert "lr=0.0001" in ing_table and "Shared by all ingredients: epochs=10" in ing_table
    assert "0.5000" in ing_table and "`/runs/ing/ing_lr1e-4`" in ing_table
    # Progressions name ingredients given by index; learned soups show their final epoch compactly.
    assert "## greedy soup: held-out accuracy with N ingredients" in text
    greedy = text.split("## greedy soup")[1].split("##")[0]
    assert "| 1 | ing_lr3e-5 | add | 2 | 82.50 | 82.50 |" in greedy
    assert "## pruned soup" not in text  # Empty progressions are left out.
    assert "| learned_global | 2 | 0.6100 | 0.5200 | 81.50 | 82.66 | 82.77 (epoch 1) |" in text


def test_markdown_without_extras(results):
    text = report.markdown_table(_strip_extras(results))
    assert "shift" not in text.split("## Soups")[1].split("## Ingredients")[0].lower()
    assert "Learned soups" not in text and "held-out accuracy with N" not in text
    assert "**+1.20 (p=0.003)**" in text


# --------------------------------------------------------------------------------------------------
# Files


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_write_report_writes_every_file(results, tmp_path):
    out = tmp_path / "report"
    written = report.write_report(results, out)
    assert set(written) == {"markdown", "json", "csv", "scatter", "greedy"}
    # Nothing else in the directory: no leftover temporary files.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "report.json", "report.csv", "scatter.png", "greedy.png"])
    assert written["markdown"].read_text() == report.markdown_table(results)
    assert json.loads(written["json"].read_text()) == results
    with open(written["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["type", "name", "n_ingredients", "heldout", "test_accuracy", "test_loss",
                             "shift_mean", "rot", "noise"]
    assert [(r["type"], r["name"]) for r in rows] == [
        ("individual", "best_ingredient"), ("soup", "uniform"), ("soup", "greedy"),
        ("ensemble", "ensemble"), ("ingredient", "ing_lr3e-5"), ("ingredient", "ing_lr1e-4"),
        ("ingredient", "ing_lr3e-4")]
    assert float(rows[2]["test_accuracy"]) == 0.8243 and float(rows[2]["rot"]) == 0.645
    for key in ("scatter", "greedy"):
        _assert_png(written[key])


def test_write_report_without_extras(results, tmp_path):
    written = report.write_report(_strip_extras(results), tmp_path)
    assert set(written) == {"markdown", "json", "csv", "scatter"}
    _assert_png(written["scatter"])
    header = written["csv"].read_text().splitlines()[0]
    assert header == "type,name,n_ingredients,heldout,test_accuracy,test_loss,shift_mean"


def test_failed_write_leaves_nothing(tmp_path):
    def explode(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.write_atomic(tmp_path / "report.md", explode)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# inspect


@pytest.fixture
def inspect() -> dict:
    return {
        "names": ["a", "b", "c"],
        "angles_deg": [[0.0, 87.5, 88.1], [87.5, 0.0, 86.0], [88.1, 86.0, 0.0]],
        "l2": [[0.0, 1.25, 1.5], [1.25, 0.0, 1.125], [1.5, 1.125, 0.0]],
        "interpolation": [{"a": "a", "b": "b", "alphas": [0.0, 0.5, 1.0], "heldout": [0.80, 0.83, 0.81]}],
    }


def test_inspect_table(inspect):
    text = report.inspect_table(inspect)
    assert "| 0 a | 0.0 | 87.5 | 88.1 |" in text
    assert "| 2 c | 1.5 | 1.125 | 0 |" in text
    assert "| held-out % | 80.00 | 83.00 | 81.00 |" in text
    assert "Best at α = 0.50: 83.00% (+2.00 points over the better endpoint)" in text


def test_write_inspect(inspect, tmp_path):
    written = report.write_inspect(inspect, tmp_path)
    assert set(written) == {"markdown", "json", "angles", "interpolation"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["inspect.md", "inspect.json", "angles.png", "interpolation.png"])
    assert json.loads(written["json"].read_text()) == inspect
    _assert_png(written["angles"])
    _assert_png(written["interpolation"])
    # No interpolation curves: no interpolation plot, and still no error.
    bare = dict(inspect, interpolation=[])
    assert set(report.write_inspect(bare, tmp_path / "bare")) == {"markdown", "json", "angles"}
