"""The soup report and its statistics: McNemar by hand, the Markdown a user reads, the files on disk,
the newer methods' columns and sections, and experiments/summarize.py's table over several runs."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from soupjax import report
from soupjax.io import files
from soupjax.report import stats

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


@pytest.mark.parametrize("n", [1, 2, 7, 12, 13, 40, 401, 5000])
def test_binomial_p_is_scipys(n):
    """The exact sum soupjax computes instead of importing scipy.stats: scipy's two-sided binomial test,
    over every count for small n and across the range (tails far below 1e-300 included) for large n."""
    ks = range(n + 1) if n <= 40 else sorted({0, 1, n // 3, n // 2 - 1, n // 2, n // 2 + 1, n - 2, n})
    for k in ks:
        want = scipy_stats.binomtest(k, n, 0.5).pvalue
        assert stats.binomial_two_sided_p(k, n) == pytest.approx(min(want, 1.0), rel=1e-9, abs=1e-300), (k, n)
    with pytest.raises(ValueError, match="k=3, n=2"):
        stats.binomial_two_sided_p(3, 2)


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


def _table_names(table: str) -> list[str]:
    """The first cell of each body row of the first Markdown table in ``table``."""
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    return [line.split("|")[1].strip() for line in lines[2:]]


# --------------------------------------------------------------------------------------------------
# Markdown


def test_markdown_table_reads_well(results):
    text = report.markdown_table(results)
    for entry in results["soups"] + results["ingredients"]:
        assert entry["name"] in text
    soup_table = text.split("## Soups")[1].split("##")[0]
    # Ranking: the reference first, then by test accuracy, best first (the fixture lists them otherwise).
    assert _table_names(soup_table) == ["best_ingredient", "ensemble", "greedy", "uniform"]
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
    # An old-style results dict: none of the newer methods' columns, legends or sections.
    header = soup_table.strip().splitlines()[0]
    assert header == ("| recipe | ingredients | forward passes | held-out % | test % | Δ test vs best (p) "
                      "| shift mean % | Δ shift vs best (p) | cook time |")
    for absent in ("Kinds:", "Methods:", "## Hyperparameters chosen", "## WiSE-FT", "MiB"):
        assert absent not in text


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
    # Soups in the report's ranking, then the ingredients in their own order.
    assert [(r["type"], r["name"]) for r in rows] == [
        ("individual", "best_ingredient"), ("ensemble", "ensemble"), ("soup", "greedy"),
        ("soup", "uniform"), ("ingredient", "ing_lr3e-5"), ("ingredient", "ing_lr1e-4"),
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
# The newer merge methods: kinds, costs, grids, WiSE-FT


@pytest.fixture
def new_results(results) -> dict:
    """``results`` as the registry-based cooking writes it: new rows, per-row costs, grids, WiSE-FT."""
    new = copy.deepcopy(results)
    vs = {"test": {"diff": 0.005, "p": 0.2, "n": 10000}, "shift": {"diff": 0.01, "p": 0.01, "n": 20000}}
    rows = {s["name"]: s for s in new["soups"]}
    rows["best_ingredient"].update(method=None, heldout_evals=0, peak_memory_mb=None, chosen=None)
    rows["uniform"].update(method="uniform", heldout_evals=0, peak_memory_mb=3.21, chosen=None)
    rows["greedy"].update(method="greedy", heldout_evals=3, peak_memory_mb=6.5, chosen=None)
    rows["ensemble"].update(method="ensemble", heldout_evals=0, peak_memory_mb=None, chosen=None)
    ties = _soup("ties", "merge", 3, 1, 0.831, 0.8200, {"rot": 0.64, "noise": 0.53}, vs)
    ties.update(method="ties", heldout_evals=4, peak_memory_mb=12.34, chosen={"density": 0.2, "lambda": 1.0})
    # Same test accuracy as ties: the stable sort keeps the cooking order between them.
    dare = _soup("dare", "merge", 3, 1, 0.829, 0.8200, {"rot": 0.63, "noise": 0.52}, vs)
    dare.update(method="dare", heldout_evals=2, peak_memory_mb=1536.0)  # No "chosen": best held-out.
    wise = _soup("wise_ft_uniform", "merge", 3, 1, 0.826, 0.8150, {"rot": 0.66, "noise": 0.55}, vs)
    wise.update(method="wise_ft", heldout_evals=11, peak_memory_mb=4.0, chosen={"alpha": 0.3})
    greedy_ens = _soup("greedy_ensemble", "ensemble", 2, 2, 0.832, 0.8290, {"rot": 0.65, "noise": 0.55}, vs)
    greedy_ens.update(method="greedy_ensemble", heldout_evals=3, peak_memory_mb=None, chosen=None)
    new["soups"] += [ties, dare, wise, greedy_ens]
    new["grids"] = {
        "ties": [{"options": {"density": d, "lambda": lam}, "heldout": h}
                 for (d, lam), h in zip([(0.2, 0.5), (0.2, 1.0), (0.5, 0.5), (0.5, 1.0)],
                                        [0.8250, 0.8310, 0.8275, 0.8300])],
        "dare": [{"options": {"drop": 0.5}, "heldout": 0.8290}, {"options": {"drop": 0.9}, "heldout": 0.8210}],
    }
    alphas = [round(0.1 * i, 1) for i in range(11)]
    # WiSE-FT records its alphas as a grid too; the report shows them once, in the WiSE-FT section.
    new["grids"]["wise_ft_uniform"] = [{"options": {"alpha": a}, "heldout": 0.8} for a in alphas]
    new["wise_ft"] = {"wise_ft_uniform": {
        "base": "uniform", "alphas": alphas,
        "heldout": [0.70 + 0.04 * i - 0.0035 * i * i for i in range(11)],
        "test": [0.69 + 0.04 * i - 0.0035 * i * i for i in range(11)],
        "shift_mean": [0.50 + 0.05 * i - 0.004 * i * i for i in range(11)],
        "chosen_alpha": 0.3,
    }}
    new["methods"] = {"uniform": "Average all ingredients.", "greedy": "Add ingredients while held-out improves.",
                      "ties": "Trim, elect sign, disjoint merge of task vectors.",
                      "dare": "Drop and rescale task vectors, then add.",
                      "wise_ft": "Interpolate between the init and a soup.",
                      "ensemble": "Average the outputs.", "greedy_ensemble": "Greedy choice of ensemble members.",
                      "learned": "Mixing weights learned on held-out."}
    return new


def test_markdown_ranks_every_row_with_the_new_columns(new_results):
    text = report.markdown_table(new_results)
    soup_table = text.split("## Soups")[1].split("##")[0]
    assert _table_names(soup_table) == ["best_ingredient", "ensemble", "greedy_ensemble", "greedy", "ties",
                                        "dare", "wise_ft_uniform", "uniform"]
    header = soup_table.strip().splitlines()[0]
    assert header == ("| recipe | kind | ingredients | forward passes | held-out % | test % | Δ test vs best (p) "
                      "| shift mean % | Δ shift vs best (p) | cook time | held-out evals | peak memory | chosen |")
    lines = {name: line for name, line in zip(_table_names(soup_table),
                                               soup_table.strip().splitlines()[2:])}
    assert lines["ties"].startswith("| ties | merge | 3 | 1 | 83.10 | 82.00 | +0.50 (p=0.2) |")
    assert lines["ties"].endswith("| 4 | 12.3 MiB | density=0.2, lambda=1 |")
    assert lines["dare"].endswith("| 2 | 1,536.0 MiB | – |")
    assert lines["best_ingredient"].endswith("| 0 | – | – |")
    assert "(reference)" in lines["best_ingredient"] and "(reference)" not in lines["ensemble"]
    # The legend says what a merge is and lists the methods, naming the rows a method cooked.
    assert "- merge: one model built from the ingredients' displacements" in soup_table
    assert "- `ties`: Trim, elect sign, disjoint merge of task vectors." in soup_table
    assert "- `learned`: Mixing weights learned on held-out." in soup_table
    assert "- `wise_ft` (wise_ft_uniform): Interpolate between the init and a soup." in soup_table
    assert "- Best on test: **ensemble**" in soup_table


def test_markdown_grid_section_marks_the_chosen_point(new_results):
    text = report.markdown_table(new_results)
    grids = text.split("## Hyperparameters chosen on the held-out split")[1].split("\n## ")[0]
    ties = grids.split("### ties")[1].split("###")[0]
    assert "method `ties`; 4 points." in ties
    assert "| density | lambda | held-out % |" in ties
    assert "| **0.2** | **1** | **83.10** |" in ties  # The recorded choice, not the first or last point.
    assert "| 0.5 | 1 | 83.00 |" in ties and ties.count("**") == 6
    # No recorded choice: the best held-out point is bold, and the text says why.
    dare = grids.split("### dare")[1]
    assert "no choice recorded; bold marks the best held-out point" in dare
    assert "| **0.5** | **82.90** |" in dare and "| 0.9 | 82.10 |" in dare
    assert "### wise_ft_uniform" not in grids and "WiSE-FT's α: see the WiSE-FT section." in grids


def test_markdown_wise_ft_section(new_results):
    text = report.markdown_table(new_results)
    assert text.index("## Hyperparameters chosen") < text.index("## WiSE-FT")
    wise = text.split("## WiSE-FT")[1]
    assert "### wise_ft_uniform (base: uniform)" in wise and "Chosen α = 0.30." in wise
    assert "| α | held-out % | test % | shift mean % |" in wise
    # alpha = 0.3: held-out 0.70 + 0.12 - 0.0315, test 0.69 + 0.12 - 0.0315, shift 0.50 + 0.15 - 0.036.
    assert "| **0.30** | **78.85** | **77.85** | **61.40** |" in wise
    assert "| 0.00 | 70.00 | 69.00 | 50.00 |" in wise and "| 1.00 |" in wise
    assert wise.count("**") == 2 * 4 + 2  # The chosen row, and "bold" in the explanation.


def test_write_report_with_new_fields(new_results, tmp_path):
    written = report.write_report(new_results, tmp_path)
    assert set(written) == {"markdown", "json", "csv", "scatter", "greedy", "wise_ft"}
    assert written["wise_ft"] == tmp_path / "wise_ft.png"
    _assert_png(written["wise_ft"])
    with open(written["csv"], newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == [
        "type", "name", "n_ingredients", "heldout", "test_accuracy", "test_loss", "shift_mean", "method",
        "heldout_evals", "peak_memory_mb", "chosen", "rot", "noise"]
    assert rows["ties"]["type"] == "merge" and rows["ties"]["method"] == "ties"
    assert rows["ties"]["heldout_evals"] == "4" and float(rows["ties"]["peak_memory_mb"]) == 12.34
    assert json.loads(rows["ties"]["chosen"]) == {"density": 0.2, "lambda": 1.0}
    assert rows["best_ingredient"]["peak_memory_mb"] == "" and rows["dare"]["chosen"] == ""
    assert rows["ing_lr1e-4"]["method"] == ""


def test_new_fields_tolerate_gaps(new_results, tmp_path):
    """Odd but possible inputs: a choice outside the grid, curves without shifts or test accuracies."""
    odd = copy.deepcopy(new_results)
    curve = odd["wise_ft"]["wise_ft_uniform"]
    curve["shift_mean"] = [None] * 11
    curve["chosen_alpha"] = 0.35  # Not on the grid of alphas: nothing is bold.
    curve["test"] = curve["test"][:5]  # Cut short: the rest reads as missing.
    odd["grids"]["ties"][1]["heldout"] = float("nan")
    next(s for s in odd["soups"] if s["name"] == "ties")["chosen"] = {"density": 0.3, "lambda": 1.0}
    odd["grids"]["empty"] = []
    text = report.markdown_table(odd)
    wise = text.split("## WiSE-FT")[1]
    assert "shift mean" not in wise and "The chosen α is not among the α evaluated." in wise
    assert "| 1.00 | 75.00 | – |" in wise and "**0." not in wise
    ties = text.split("### ties")[1].split("###")[0]
    assert "chosen density=0.3, lambda=1, not one of the points below" in ties
    assert "| 0.2 | 1 | – |" in ties and "**" not in ties
    assert "### empty" not in text
    written = report.write_report(odd, tmp_path)
    _assert_png(written["wise_ft"])
    # No test or shift accuracy at any alpha: nothing to plot, so no wise_ft.png and no key for it.
    curve["test"] = []
    assert "wise_ft" not in report.write_report(odd, tmp_path / "no_plot")


# --------------------------------------------------------------------------------------------------
# experiments/summarize.py


def _experiment_module(name: str):
    """``experiments/NAME.py`` (a script, not a package module) loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summarize_module():
    return _experiment_module("summarize")


def test_summarize_covers_every_row_in_ranking_order(results, new_results):
    summarize = _summarize_module()
    # Seed 0 made before the new methods existed, seed 1 with them.
    table = summarize.summary_table([results, new_results])
    names = [name.split(" (")[0] for name in _table_names(table)]
    assert names == ["best_ingredient", "ensemble", "greedy_ensemble", "greedy", "ties", "dare",
                     "wise_ft_uniform", "uniform"]
    header = table.splitlines()[0]
    assert header.endswith("| p<0.05 (+/−) | held-out evals | peak memory |")
    lines = dict(zip(_table_names(table), table.splitlines()[2:]))
    assert "ties (1/2 runs)" in lines and "greedy" in lines  # greedy is in both runs: no count.
    assert lines["ties (1/2 runs)"] == ("| ties (1/2 runs) | 3.0 | 82.00 ± 0.00 | 0.50 ± 0.00 | 0/0 | 58.50 ± 0.00 "
                                        "| 1.00 ± 0.00 | 1/0 | 4 | 12.3 MiB |")
    # greedy: Δ test +1.20 in both runs (p=0.003, significant), held-out evals only in the second run.
    assert lines["greedy"].startswith("| greedy | 2.0 | 82.43 ± 0.00 | 1.20 ± 0.00 | 2/0 |")
    assert lines["greedy"].endswith("| 3 | 6.5 MiB |")
    assert lines["best_ingredient"].split(" | ")[3] == "(reference)"
    # Old-style reports only: the old columns, nothing else.
    old = summarize.summary_table([results, results])
    assert old.splitlines()[0] == ("| recipe | ingredients | test % | Δ test vs best | p<0.05 (+/−) | shift mean % "
                                   "| Δ shift vs best | p<0.05 (+/−) |")
    assert "runs)" not in old

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


# --------------------------------------------------------------------------------------------------
# experiments/regime_map.py


def test_regime_map_reads_heldout_logits_only_and_measures_the_ensemble_gain(tmp_path):
    """Three ingredients, each right on a different 60% of 1,000 held-out images: the best alone scores
    0.6; the mean of their logits is right wherever two of three are (a majority), which is known here.
    The test split's logits are poisoned: reading them would show in the figures."""
    from soupjax.io import checkpoints
    regime_map = _experiment_module("regime_map")
    rng = np.random.default_rng(0)
    n, classes = 1000, 4
    labels = rng.integers(0, classes, n).astype(np.int32)
    right = np.zeros((3, n), bool)
    for k in range(3):
        right[k, rng.permutation(n)[:600 - 50 * k]] = True
    ingredients = tmp_path / "work" / "ingredients-seed0"
    for k in range(3):
        logits = np.zeros((n, classes), np.float32)
        logits[np.arange(n), np.where(right[k], labels, (labels + 1) % classes)] = 1.0
        directory = ingredients / f"sweep0_{k:03d}"
        directory.mkdir(parents=True)
        (directory / "variables").mkdir()
        (directory / "meta.json").write_text(json.dumps({"steps": 10, "wall_seconds": 60.0,
                                                          "metrics": {"heldout": {"accuracy": right[k].mean()}}}))
        np.savez(directory / checkpoints.EVAL_FILE, **{"heldout/logits": logits, "heldout/labels": labels,
                                                      "test/logits": np.full((7, classes), np.nan, np.float32),
                                                      "test/labels": np.zeros(7, np.int32)})
    figures = regime_map.arm_figures(tmp_path / "work", 0)
    # Where the ingredients disagree the mean of one-hot logits ties; argmax takes the lowest class.
    mean = np.stack([np.eye(classes)[np.where(right[k], labels, (labels + 1) % classes)] for k in range(3)]).mean(0)
    want = (mean.argmax(-1) == labels).mean()
    assert figures["best_name"] == "sweep0_000" and figures["best_heldout"] == pytest.approx(0.6)
    assert figures["ensemble_heldout"] == pytest.approx(want) and figures["examples"] == n
    assert figures["gain"] == pytest.approx(want - 0.6)
    assert 0.005 < figures["gain_se"] < 0.05  # a difference of two accuracies on 1,000 paired examples
    assert figures["geometry"] is None and figures["minutes"]["ingredients_wall"] == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------------
# experiments/regime_figure.py


def _soups_report(rows: list[tuple[str, str, float, float]]) -> str:
    """A report.md "Soups" table with (recipe, kind, held-out %, test %) rows, other columns filled in."""
    lines = ["# Model soup report", "", "## Soups", "",
             "| recipe | kind | ingredients | held-out % | test % | Δ test vs best (p) |",
             "|:---|:---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {kind} | 8 | {heldout:.2f} | {test:.2f} | **+0.00 (p=1)** |" for name, kind, heldout, test in rows]
    return "\n".join(lines + ["", "Δ: accuracy minus ...", ""])


def test_regime_figure_takes_the_best_merge_on_heldout_and_finds_a_predictor(tmp_path):
    """Six points where the uniform soup's test gain rises with the held-out ensemble gain: Spearman 1 over
    6 points predicts (the rule's threshold); the best merge is the one best on held-out, not on test."""
    figure = _experiment_module("regime_figure")
    specs = []
    for k in range(6):
        gain = -0.5 + 0.2 * k   # held-out ensemble gain, points
        report = tmp_path / f"r{k}.md"
        report.write_text(_soups_report([
            ("best_ingredient", "individual", 90.0, 90.0), ("ensemble", "ensemble", 90.0 + gain, 90.1),
            ("uniform", "soup", 89.0, 90.0 + 2 * gain - 0.1), ("greedy", "soup", 90.0, 90.0),
            ("learned_layer", "soup", 90.2, 90.0 - 0.1 * (k % 2)),
            ("ties", "merge", 89.5, 95.0), ("slerp", "merge", 90.1, 90.3), ("dare", "merge", 90.1, 80.0)]))
        specs.append(f"arm{k % 3}:{k}:{report}")
    points = [figure.point(spec) for spec in specs]
    assert {p["best_merge"] for p in points} == {"slerp"}, "highest held-out, the first of a tie, never test"
    assert points[0]["heldout_ensemble_gain"] == pytest.approx(-0.5)
    assert points[0]["test_gain"]["best_merge"] == pytest.approx(0.3)
    assert points[0]["angle_mean"] is None, "a report alone has no geometry"
    corr = {(c["predictor"], c["soup"]): c for c in figure.correlations(points)}
    uniform = corr[("heldout_ensemble_gain", "uniform")]
    assert uniform["points"] == 6 and uniform["spearman"] == pytest.approx(1.0) and uniform["predicts"]
    assert uniform["slope"] == pytest.approx(2.0) and uniform["intercept"] == pytest.approx(-0.1)
    assert not corr[("heldout_ensemble_gain", "greedy")]["predicts"], "a constant gain has no correlation"
    assert not corr[("heldout_ensemble_gain", "learned_layer")]["predicts"]
    assert corr[("angle_mean", "uniform")]["points"] == 0
    assert not figure.correlations(points[:5])[0]["predicts"], "5 points are too few for the rule"
    out = tmp_path / "fig" / "regime"
    import sys
    from unittest import mock
    with mock.patch.object(sys, "argv", ["regime_figure.py", *specs, "--out", str(out)]):
        figure.main()
    assert "| arm0 | 0 | -0.50 |" in out.with_suffix(".md").read_text()
    _assert_png(out.with_suffix(".png"))
