"""The regime map's held-out figures (issue 20, experiments/RESULTS.md "the regime map"): for each arm,
from held-out data alone, how much the logit ensemble of its ingredients gains over the best of them,
and the ingredients' geometry.

    python experiments/regime_map.py runs/map-today runs/map-small_data runs/map-narrow_lr [--seed 0]

Each argument is an arm's study work directory (``python -m soupjax.experiment --config
configs/fashion_mnist_vit.py:regime=NAME --workdir DIR --ingredients_only``). Read per arm, never a test
or shift split:

- every ingredient's held-out logits and labels, kept beside it by training (``eval_logits.npz``);
- ``DIR/inspect-seedN/inspect.json`` when ``python -m soupjax.soup --recipe inspect`` was run there:
  the angles between displacements and the held-out accuracy along the line between the two best.

Printed, and written to ``DIR/regime-map-seedN.json``: the best ingredient's held-out accuracy (chosen
on that same held-out split, as the soups' ranking does), the logit ensemble's (mean of the logits, as
the ``ensemble`` recipe), the gain and its paired bootstrap standard error (the rule counts a gain
above twice that), the angles, the interpolation barrier (the mean of the line's two ends less its
lowest inner point), and the training time of the arm's upstream model and ingredients.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.io import checkpoints

BOOTSTRAP_RESAMPLES = 2000


def heldout_logits(ingredient: Path) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, classes], labels [n]) of the held-out split, as training evaluated it."""
    with np.load(ingredient / checkpoints.EVAL_FILE) as saved:
        return saved["heldout/logits"], saved["heldout/labels"]


def ensemble_gain(logits: list[np.ndarray], labels: np.ndarray, *, seed: int = 0,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Held-out accuracy of the best single model and of the mean-logit ensemble, their difference,
    and the standard error of that difference: a paired bootstrap over the examples, the best model
    chosen again on each resample (the choice is part of what the rule measures)."""
    correct = np.stack([l.argmax(-1) == labels for l in logits])          # [K, n]
    ensemble = np.mean(np.stack(logits), 0).argmax(-1) == labels           # [n]
    accuracy = correct.mean(1)
    best = int(np.argmax(accuracy))
    rng = np.random.default_rng(seed)
    n = len(labels)
    gains = np.empty(resamples)
    for r in range(resamples):
        rows = rng.integers(0, n, n)
        gains[r] = ensemble[rows].mean() - correct[:, rows].mean(1).max()
    return {"best": best, "best_heldout": float(accuracy[best]), "ensemble_heldout": float(ensemble.mean()),
            "gain": float(ensemble.mean() - accuracy[best]), "gain_se": float(gains.std(ddof=1)),
            "heldout_accuracies": accuracy.tolist(), "examples": n}


def geometry(inspect_json: Path) -> dict[str, Any] | None:
    """Angles (mean, min, max over pairs) and the barrier along the first (best) interpolation line."""
    if not inspect_json.is_file():
        return None
    result = json.loads(inspect_json.read_text())
    out: dict[str, Any] = {}
    if result.get("angles_deg") is not None:
        angles = np.asarray(result["angles_deg"], float)
        pairs = angles[np.triu_indices(len(angles), 1)]
        out.update(angle_mean=float(pairs.mean()), angle_min=float(pairs.min()), angle_max=float(pairs.max()))
    if result.get("interpolation"):
        line = result["interpolation"][0]
        accs = np.asarray(line["heldout"], float)
        out.update(line=f"{line['a']} -> {line['b']}", line_heldout=accs.tolist(),
                   barrier=float((accs[0] + accs[-1]) / 2 - accs[1:-1].min()),
                   midpoint_over_best_end=float(accs[len(accs) // 2] - max(accs[0], accs[-1])))
    return out


def arm_figures(workdir: Path, seed: int) -> dict[str, Any]:
    """Every held-out figure of one arm's sweep ``seed``."""
    ingredients = checkpoints.list_ingredients(workdir / f"ingredients-seed{seed}")
    if not ingredients:
        raise SystemExit(f"regime_map: no finished ingredients in {workdir / f'ingredients-seed{seed}'}")
    pairs = [heldout_logits(Path(p)) for p in ingredients]
    labels = pairs[0][1]
    if any(not np.array_equal(l, labels) for _, l in pairs):
        raise SystemExit(f"regime_map: the ingredients of {workdir} were evaluated on different held-out splits")
    metas = [checkpoints.load_meta(p) for p in ingredients]
    figures = ensemble_gain([logits for logits, _ in pairs], labels)
    figures["best_name"] = Path(ingredients[figures["best"]]).name
    figures["geometry"] = geometry(workdir / f"inspect-seed{seed}" / "inspect.json")
    upstream = workdir / "upstream" / "ingredient"
    figures["upstream_heldout"] = checkpoints.load_meta(upstream)["metrics"]["heldout"]["accuracy"] \
        if checkpoints.is_ingredient(upstream) else None
    figures["minutes"] = {
        "upstream_wall": checkpoints.load_meta(upstream).get("wall_seconds", 0) / 60
        if checkpoints.is_ingredient(upstream) else None,
        "ingredients_wall": sum(m.get("wall_seconds", 0) for m in metas) / 60}
    figures["steps"] = [m["steps"] for m in metas]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| arm | best ingredient (held-out %) | ensemble (held-out %) | gain (points) | 2 x SE | "
          "angles (mean, min-max) | barrier (points) | upstream held-out % | minutes (upstream + ingredients) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workdir in args.workdirs:
        figures = arm_figures(workdir, args.seed)
        (workdir / f"regime-map-seed{args.seed}.json").write_text(json.dumps(figures, indent=1))
        geo = figures["geometry"] or {}
        angles = (f"{geo['angle_mean']:.1f} ({geo['angle_min']:.1f}-{geo['angle_max']:.1f})"
                  if "angle_mean" in geo else "-")
        barrier = f"{100 * geo['barrier']:.2f}" if "barrier" in geo else "-"
        minutes = figures["minutes"]
        up = f"{100 * figures['upstream_heldout']:.2f}" if figures["upstream_heldout"] is not None else "-"
        print(f"| {workdir.name} | {100 * figures['best_heldout']:.2f} ({figures['best_name']}) | "
              f"{100 * figures['ensemble_heldout']:.2f} | {100 * figures['gain']:+.2f} | "
              f"{200 * figures['gain_se']:.2f} | {angles} | {barrier} | {up} | "
              f"{(minutes['upstream_wall'] or 0):.1f} + {minutes['ingredients_wall']:.1f} |")


if __name__ == "__main__":
    main()
