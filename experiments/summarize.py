"""Mean and spread of the study's table over several runs (different sweep seeds).

    python experiments/summarize.py runs/soupjax/study/soups-seed0 runs/soupjax/study/soups-seed1 ...

Reads each run's report.json and prints, per recipe, the mean and standard deviation over runs of the
held-out, test and mean-shift accuracy, of the difference to the best ingredient, and how many runs
had a significant (McNemar p < 0.05) gain or loss.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(paths: list[str]) -> None:
    reports = [json.loads((Path(p) / "report.json").read_text()) for p in paths]
    order = [row["name"] for row in reports[0]["soups"]]
    print(f"{len(reports)} runs: {', '.join(paths)}\n")
    print("| recipe | ingredients | test % | Δ test vs best | p<0.05 (+/−) | shift mean % | Δ shift vs best | p<0.05 (+/−) |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|")
    for name in order:
        rows = [next(r for r in rep["soups"] if r["name"] == name) for rep in reports]

        def stat(values):
            values = 100 * np.asarray(values, float)
            return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0:.2f}"

        def sig(kind):
            tests = [r["vs_best"][kind] for r in rows if r.get("vs_best") and r["vs_best"].get(kind)]
            if not tests:
                return "–"
            return f"{sum(t['p'] < 0.05 and t['diff'] > 0 for t in tests)}/{sum(t['p'] < 0.05 and t['diff'] < 0 for t in tests)}"

        dtest = [r["vs_best"]["test"]["diff"] for r in rows if r.get("vs_best")]
        dshift = [r["vs_best"]["shift"]["diff"] for r in rows if r.get("vs_best") and r["vs_best"].get("shift")]
        n = [r["n_ingredients"] for r in rows]
        print(f"| {name} | {np.mean(n):.1f} | {stat([r['test']['accuracy'] for r in rows])} | "
              f"{stat(dtest) if dtest else '(reference)'} | {sig('test')} | "
              f"{stat([r['shift_mean'] for r in rows])} | {stat(dshift) if dshift else '(reference)'} | {sig('shift')} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
