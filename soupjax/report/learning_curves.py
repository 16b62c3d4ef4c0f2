"""The held-out learning curves of a study: did the upstream model and every ingredient level off?

    python -m soupjax.report.learning_curves runs/regime --seeds 100 --out experiments/results/curves-pilot

The study (``python -m soupjax.experiment``) writes them for its sweep beside its report.

Reads the ``heldout_curve`` each run keeps in its meta.json (``eval_every_steps``) and writes
OUT.md (one row per run: its hyperparameters, where the plateau rule fired, the gain over its last
epoch before the cool-down, the final held-out accuracy) and OUT.png (the curves, in epochs). Held-out
data only: this is what the regime is chosen from, before any soup is cooked.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from soupjax import data
from soupjax.io import files
from soupjax.io.checkpoints import list_ingredients, load_meta


def describe(meta: dict[str, Any], steps_per_epoch: float) -> dict[str, Any]:
    """One run's curve and what the rule made of it."""
    curve = [(int(s), float(a)) for s, a in meta.get("heldout_curve", [])]
    config = meta["config"]
    every = int(config.get("eval_every_steps") or 0)
    decided = meta.get("decay_start")
    before = [a for s, a in curve if decided is None or s <= decided]
    per_epoch = max(1, round(steps_per_epoch / every)) if every else 1
    gain = (before[-1] - max(before[:-per_epoch])) if len(before) > per_epoch else float("nan")
    return {
        "name": meta["name"], "hparams": meta.get("hparams", {}), "curve": curve,
        "steps_per_epoch": steps_per_epoch, "steps": int(meta["steps"]), "decay_start": decided,
        "levelled_off_epoch": decided / steps_per_epoch if decided is not None else None,
        "epochs": int(meta["steps"]) / steps_per_epoch,
        "max_epochs": float(config.get("num_epochs", 0.0)),
        "last_epoch_gain": gain,
        "heldout": float(meta["metrics"]["heldout"]["accuracy"]),
    }


def _steps_per_epoch(meta: dict[str, Any]) -> float:
    from ml_collections import ConfigDict
    cfg = ConfigDict(files.plain(meta["config"]["data"]))
    return data.num_examples(cfg, "train") / int(meta["config"]["batch_size"])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | hyperparameters | levelled off (epoch) | trained (epochs, max) | gain over the last epoch "
             "before cool-down (points) | final held-out % |", "|:---|:---|---:|---:|---:|---:|"]
    for r in rows:
        hp = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                       for k, v in r["hparams"].items() if k != "seed") or "-"
        off = f"{r['levelled_off_epoch']:.1f}" if r["levelled_off_epoch"] is not None else "never (capped)"
        lines.append(f"| {r['name']} | {hp} | {off} | {r['epochs']:.1f} ({r['max_epochs']:g}) | "
                     f"{100 * r['last_epoch_gain']:+.2f} | {100 * r['heldout']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from soupjax.report.figures import figure, save_png
    fig = figure(10, 4)
    up, down = fig.subplots(1, 2)
    for ax, group, title in ((up, [r for r in rows if r["name"] == "upstream"], "upstream (classes 0-4)"),
                             (down, [r for r in rows if r["name"] != "upstream"], "ingredients (classes 5-9)")):
        for r in group:
            xs = [s / r["steps_per_epoch"] for s, _ in r["curve"]]
            line, = ax.plot(xs, [100 * a for _, a in r["curve"]], marker=".", label=r["name"])
            if r["decay_start"] is not None:
                ax.axvline(r["decay_start"] / r["steps_per_epoch"], color=line.get_color(), ls=":", lw=1)
            ax.plot([r["epochs"]], [100 * r["heldout"]], marker="*", ms=10, color=line.get_color())
        ax.set(title=title, xlabel="epoch", ylabel="held-out accuracy %")
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=7)
    fig.suptitle("held-out accuracy during training; dotted: plateau rule fired, cool-down begins; star: final")
    return save_png(path, fig)


def collect(workdir: Path, seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    upstream = workdir / "upstream" / "ingredient"
    if upstream.is_dir():
        meta = load_meta(upstream)
        rows.append(dict(describe(meta, _steps_per_epoch(meta)), name="upstream"))
    for seed in seeds:
        for directory in list_ingredients(workdir / f"ingredients-seed{seed}"):
            meta = load_meta(directory)
            rows.append(describe(meta, _steps_per_epoch(meta)))
    return rows


def write(workdir: Path, seeds: list[int], out: Path) -> str:
    """Write OUT.md and OUT.png for the runs of ``seeds`` under ``workdir``; return the table."""
    rows = collect(workdir, seeds)
    if not rows:
        raise ValueError(f"no finished runs with learning curves under {workdir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    files.write_files_atomic({out.with_suffix(".md"): lambda tmp: tmp.write_text(table),
                              out.with_suffix(".png"): lambda tmp: plot(rows, tmp)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seeds", default="0", help="comma-separated sweep seeds")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    try:
        table = write(args.workdir, [int(s) for s in args.seeds.split(",")], args.out)
    except ValueError as error:
        raise SystemExit(str(error))
    print(table)
    print(json.dumps({"table": str(args.out.with_suffix(".md")), "plot": str(args.out.with_suffix(".png"))}))


if __name__ == "__main__":
    main()
