"""The regime map's figure across arms and its predictor analysis (issue 20, experiments/RESULTS.md "What
follows the choice"): for each (arm, sweep seed), the held-out ensemble gain against each soup's test
gain over the best ingredient, and how well held-out figures predict those gains.

    python experiments/regime_figure.py today:0:runs/map-today small_data:0:runs/map-small_data \\
        today:1:experiments/results/study-merges-seed1-report.md --out experiments/results/regime-figure

A point is ``ARM:SEED:WHERE``. WHERE is either an arm's study work directory, which holds
``regime-map-seedN.json`` (``experiments/regime_map.py``: the held-out figures and the geometry) and
``soups-seedN/report.md``, or a cook's ``report.md`` alone, whose ``best_ingredient`` and ``ensemble``
rows give the held-out ensemble gain (and no geometry). Soups (fixed before any arm was cooked): the
uniform soup, the greedy soup, the learned soup by layer, and the best merge, the row of kind ``merge``
with the highest held-out accuracy (the first in the report's order on a tie). Writes OUT.png (the
figure), OUT.md (the points and the correlations) and OUT.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

SOUPS = ("uniform", "greedy", "learned_layer", "best_merge")
PREDICTORS = ("heldout_ensemble_gain", "angle_mean", "barrier")
# The rule of RESULTS.md: a predictor predicts a soup's gain when |Spearman rho| >= 0.8 over >= 6 points.
PREDICTS_RHO, PREDICTS_POINTS = 0.8, 6


def soup_rows(report_md: Path) -> dict[str, dict[str, Any]]:
    """The report's "Soups" table: recipe name -> {kind, heldout, test} (percent; kind '' when the report
    predates the column)."""
    lines = report_md.read_text().splitlines()
    try:
        start = lines.index("## Soups")
    except ValueError:
        raise SystemExit(f"regime_figure: {report_md} has no '## Soups' table") from None
    table = _first_table(lines[start + 1:])
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows: dict[str, dict[str, Any]] = {}
    for line in table[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["recipe"]] = {"kind": cells.get("kind", ""), "heldout": float(cells["held-out %"]),
                                 "test": float(cells["test %"])}
    if "best_ingredient" not in rows:
        raise SystemExit(f"regime_figure: {report_md} has no best_ingredient row")
    return rows


def _first_table(lines: list[str]) -> list[str]:
    table: list[str] = []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return table


def soup_gains(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each soup's test gain over the best ingredient, in points, and which merge was the best one."""
    best_test = rows["best_ingredient"]["test"]
    merges = [(name, row) for name, row in rows.items() if row["kind"] == "merge"]
    best_merge = max(merges, key=lambda m: m[1]["heldout"])[0] if merges else None  # max keeps the first tie
    gains = {name: rows[name]["test"] - best_test if name in rows else None for name in SOUPS[:3]}
    gains["best_merge"] = rows[best_merge]["test"] - best_test if best_merge else None
    gains["ensemble"] = rows["ensemble"]["test"] - best_test if "ensemble" in rows else None
    return {"test_gain": gains, "best_merge": best_merge}


def point(spec: str) -> dict[str, Any]:
    """One (arm, seed) point from ``ARM:SEED:WHERE``."""
    try:
        arm, seed, where = spec.split(":", 2)
        seed_n = int(seed)
    except ValueError:
        raise SystemExit(f"regime_figure: {spec!r} is not ARM:SEED:WHERE") from None
    where_path = Path(where)
    out: dict[str, Any] = {"arm": arm, "seed": seed_n, "source": where}
    if where_path.is_dir():
        figures = json.loads((where_path / f"regime-map-seed{seed_n}.json").read_text())
        geometry = figures.get("geometry") or {}
        out["heldout_ensemble_gain"] = 100 * figures["gain"]
        out["angle_mean"] = geometry.get("angle_mean")
        out["barrier"] = 100 * geometry["barrier"] if "barrier" in geometry else None
        rows = soup_rows(where_path / f"soups-seed{seed_n}" / "report.md")
    else:
        rows = soup_rows(where_path)
        if "ensemble" not in rows:
            raise SystemExit(f"regime_figure: {where} has no ensemble row: no held-out ensemble gain")
        out["heldout_ensemble_gain"] = rows["ensemble"]["heldout"] - rows["best_ingredient"]["heldout"]
        out["angle_mean"] = out["barrier"] = None
    out.update(soup_gains(rows))
    return out


def correlations(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman and Pearson correlation of each predictor with each soup's test gain, over the points
    that have both."""
    out = []
    for predictor in PREDICTORS:
        for soup in SOUPS:
            pairs = [(p[predictor], p["test_gain"][soup]) for p in points
                     if p.get(predictor) is not None and p["test_gain"].get(soup) is not None]
            n = len(pairs)
            x, y = (np.asarray(v, float) for v in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
            defined = n >= 3 and x.std() > 0 and y.std() > 0
            pearson = float(scipy_stats.pearsonr(x, y).statistic) if defined else None
            spearman = float(scipy_stats.spearmanr(x, y).statistic) if defined else None  # ties: mean ranks
            slope, intercept = (np.polyfit(x, y, 1).tolist() if defined else (None, None))
            out.append({"predictor": predictor, "soup": soup, "points": n, "spearman": spearman,
                        "pearson": pearson, "slope": slope, "intercept": intercept,
                        "predicts": bool(spearman is not None and abs(spearman) >= PREDICTS_RHO
                                         and n >= PREDICTS_POINTS)})
    return out


def _fmt(value: float | None, spec: str = "+.2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(points: list[dict[str, Any]], corr: list[dict[str, Any]]) -> str:
    lines = ["| arm | seed | held-out ensemble gain | mean angle | barrier | uniform | greedy | learned_layer | "
             "best merge | ensemble (test) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        g = p["test_gain"]
        lines.append(f"| {p['arm']} | {p['seed']} | {_fmt(p['heldout_ensemble_gain'])} | "
                     f"{_fmt(p['angle_mean'], '.1f')} | {_fmt(p['barrier'])} | {_fmt(g['uniform'])} | "
                     f"{_fmt(g['greedy'])} | {_fmt(g['learned_layer'])} | "
                     f"{_fmt(g['best_merge'])} ({p['best_merge'] or '-'}) | {_fmt(g['ensemble'])} |")
    lines += ["", "| predictor | soup | points | Spearman ρ | Pearson r | predicts (abs ρ ≥ 0.8, ≥ 6 points) |",
              "|---|---|---:|---:|---:|---|"]
    for c in corr:
        lines.append(f"| {c['predictor']} | {c['soup']} | {c['points']} | {_fmt(c['spearman'])} | "
                     f"{_fmt(c['pearson'])} | {'yes' if c['predicts'] else 'no'} |")
    return "\n".join(lines) + "\n"


def draw(points: list[dict[str, Any]], path: Path) -> None:
    """Held-out ensemble gain (x) against each soup's test gain (y), one panel per soup."""
    from matplotlib import colormaps

    from soupjax.report.figures import figure, save_png

    fig = figure(4.0 * len(SOUPS), 3.8)
    arms = sorted({p["arm"] for p in points})
    colors = dict(zip(arms, colormaps["tab10"].colors))
    lo = min(p["heldout_ensemble_gain"] for p in points)
    hi = max(p["heldout_ensemble_gain"] for p in points)
    for k, soup in enumerate(SOUPS):
        ax = fig.add_subplot(1, len(SOUPS), k + 1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.plot([lo, hi], [lo, hi], ls=":", color="grey", lw=0.8, label="y = x")
        for arm in arms:
            mine = [p for p in points if p["arm"] == arm and p["test_gain"][soup] is not None]
            ax.scatter([p["heldout_ensemble_gain"] for p in mine], [p["test_gain"][soup] for p in mine],
                       color=colors[arm], edgecolors="black", linewidths=0.5, label=arm, s=45)
        ax.set_title(soup.replace("_", " "))
        ax.set_xlabel("held-out ensemble gain (points)")
        if k == 0:
            ax.set_ylabel("test gain over the best ingredient (points)")
            ax.legend(fontsize=7)
    save_png(path, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("points", nargs="+", help="ARM:SEED:WHERE (a study work directory or a report.md)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.png, OUT.md and OUT.json")
    args = parser.parse_args()
    points = [point(spec) for spec in args.points]
    corr = correlations(points)
    text = markdown(points, corr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".md", lambda p: p.write_text(text)),
                          (".json", lambda p: p.write_text(json.dumps({"points": points, "correlations": corr},
                                                                      indent=1))),
                          (".png", lambda p: draw(points, p))):
        target = args.out.with_suffix(suffix)
        temporary = target.with_name(target.name + ".tmp")
        write(temporary)
        temporary.replace(target)
    print(text, end="")


if __name__ == "__main__":
    main()
