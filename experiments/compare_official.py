"""soupjax's model-soups table beside the official numbers (``experiments/reproduce_model_soups.sh``, step 4).

    python experiments/compare_official.py --official MODEL_SOUPS_CHECKOUT [--out comparison.md] REPORT.json...

The reports are soupjax's ``report.json`` files of one cook (one per recipe cooked into the same ``--out``;
a row found in several is taken from the first). The official numbers are the results files that
mlfoundations/model-soups publishes in its repository: ``individual_model_results.jsonl`` (each of the 72
ingredients), ``uniform_soup_results.jsonl``, ``greedy_soup_results.jsonl`` and, where the checkout has it,
``ensemble_results.jsonl``; one JSON object a line, accuracies as fractions under ``ImageNet2p`` (their
held-out split), ``ImageNet``, ``ImageNetV2``, ``ImageNetSketch``, ``ImageNetR``, ``ObjectNet``, ``ImageNetA``.

Printed (and written to ``--out``): a Markdown table of every soupjax row, each followed by the official
row it is compared with and the difference, where the official code published one; then each ingredient
ours against theirs. What cannot be compared is said, not computed: the held-out column (other images:
see NOTES), ObjectNet (not in TFDS), and soups the official repository publishes no numbers for.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROGRAM = "compare_official.py"
# The official results files: required, and the one read where the checkout has it.
INDIVIDUAL, UNIFORM, GREEDY = "individual_model_results.jsonl", "uniform_soup_results.jsonl", "greedy_soup_results.jsonl"
ENSEMBLE = "ensemble_results.jsonl"
# The columns: (heading, soupjax's split, the official key). None: that side has no such number.
SHIFT_COLUMNS = (("ImageNet-V2", "imagenet_v2", "ImageNetV2"), ("ImageNet-R", "imagenet_r", "ImageNetR"),
                 ("ImageNet-Sketch", "imagenet_sketch", "ImageNetSketch"), ("ImageNet-A", "imagenet_a", "ImageNetA"))
# soupjax's row -> the official results it is the same recipe as.
OFFICIAL_OF = {"best_ingredient": "best individual model", "uniform": "uniform_soup", "greedy": "greedy_soup",
               "ensemble": "ensemble"}
NOTES = """Notes on what is compared:

- Held-out: not comparable, so no difference is given. The official ImageNet2p is 26 random images per
  class of ImageNet's training set that the released models were not fine-tuned on (its index file,
  imagenet_98_idxs.npy, is not published); soupjax's held-out split is 2% of TFDS's imagenet2012 training
  split, and about 98% of its images were among those the released models were fine-tuned on (every
  training image but their ImageNet2p). Our held-out accuracies are therefore optimistic, and the greedy
  and learned soups (and the best ingredient, and WiSE-FT's alpha) are chosen on mostly seen images: they
  may choose differently from the official code.
- ObjectNet, the paper's fifth shift, is not in TFDS: the official numbers are shown, ours are n/a, and the
  mean of shifts here is over the shifts both sides have (the official plot's mean is over five).
- ImageNet (its validation set) and the shifts are the same test sets on both sides; differences come from
  the evaluation (TFDS decoding and TensorFlow's bicubic resize against PIL's, soupjax's JAX model against
  the official PyTorch one) and, for the soups chosen on held-out data, from the held-out split. The
  per-ingredient table measures the first: the same weights evaluated by both.
- The best individual model is chosen on each side's own held-out split, as in the paper."""


class CompareError(Exception):
    """Bad input: one line, exit status 2."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; ``CompareError`` naming the file and line when one is not JSON."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CompareError(f"{path}: cannot be read ({e.strerror or e})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CompareError(f"{path}, line {number}: not JSON ({e})") from None
    if not rows:
        raise CompareError(f"{path}: no results in it")
    return rows


def read_official(checkout: Path) -> dict[str, Any]:
    """The official results: ``individual`` (by model name), ``uniform``, ``greedy`` and ``ensemble`` (or None)."""
    for name in (INDIVIDUAL, UNIFORM, GREEDY):
        if not (checkout / name).is_file():
            raise CompareError(f"{checkout / name}: no such file (give a checkout of mlfoundations/model-soups)")
    individual = {row["model_name"]: row for row in read_jsonl(checkout / INDIVIDUAL)}
    official = {"individual": individual, "uniform": read_jsonl(checkout / UNIFORM)[-1],
                "greedy": read_jsonl(checkout / GREEDY)[-1],
                "ensemble": read_jsonl(checkout / ENSEMBLE)[-1] if (checkout / ENSEMBLE).is_file() else None}
    for key in ("ImageNet2p", "ImageNet"):
        for row in [*individual.values(), official["uniform"], official["greedy"]]:
            if not isinstance(row.get(key), (int, float)):
                raise CompareError(f"{checkout}: result {row.get('model_name')!r} has no {key} accuracy (not the "
                                   "official results format)")
    return official


def read_reports(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """soupjax's rows (soups, then ingredients), each name once, first report first, and the shifts reported."""
    soups: dict[str, dict[str, Any]] = {}
    ingredients: dict[str, dict[str, Any]] = {}
    shifts: list[str] = []
    for path in paths:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CompareError(f"{path}: cannot be read ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise CompareError(f"{path}: not a soupjax report.json ({e})") from None
        if not isinstance(report, dict) or "soups" not in report:
            raise CompareError(f"{path}: not a soupjax report.json (no 'soups')")
        for row in report["soups"]:
            soups.setdefault(row["name"], row)
        for row in report.get("ingredients", []):
            ingredients.setdefault(row["name"], row)
        for split in report.get("meta", {}).get("splits", {}).get("shifts", []):
            if split not in shifts:
                shifts.append(split)
    return list(soups.values()), list(ingredients.values()), shifts


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def diff(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{100 * (a - b):+.2f}"


def mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def ours_numbers(row: Mapping[str, Any], shifts: Sequence[str]) -> dict[str, float | None]:
    """A soupjax row's accuracies by column (held-out, ImageNet, the shifts we report, their mean)."""
    out: dict[str, float | None] = {"heldout": row.get("heldout"), "ImageNet": (row.get("test") or {}).get("accuracy")}
    for heading, split, _ in SHIFT_COLUMNS:
        out[heading] = (row.get("shifts") or {}).get(split) if split in shifts else None
    out["mean"] = mean([out[h] for h, split, _ in SHIFT_COLUMNS if split in shifts])
    out["ObjectNet"] = None
    return out


def official_numbers(row: Mapping[str, Any], shifts: Sequence[str]) -> dict[str, float | None]:
    """An official result's accuracies by the same columns (the mean over the shifts we report)."""
    out: dict[str, float | None] = {"heldout": row.get("ImageNet2p"), "ImageNet": row.get("ImageNet")}
    for heading, split, key in SHIFT_COLUMNS:
        out[heading] = row.get(key) if split in shifts else None
    out["mean"] = mean([out[h] for h, split, _ in SHIFT_COLUMNS if split in shifts])
    out["ObjectNet"] = row.get("ObjectNet")
    return out


def columns(shifts: Sequence[str]) -> list[str]:
    shown = [h for h, split, _ in SHIFT_COLUMNS if split in shifts]
    return ["heldout", "ImageNet", *shown, "mean", "ObjectNet"]


def headings(shifts: Sequence[str]) -> list[str]:
    names = {"heldout": "held-out", "mean": f"mean of {len([s for _, s, _ in SHIFT_COLUMNS if s in shifts])} shifts"}
    return [names.get(c, c) for c in columns(shifts)]


def label(row: Mapping[str, Any]) -> str:
    name = row["name"]
    if row.get("ingredient"):
        return f"{name} ({row['ingredient']})"
    chosen = row.get("chosen")
    if isinstance(chosen, Mapping) and "alpha" in chosen:
        return f"{name} (α={chosen['alpha']:g})"
    return name


def official_row(name: str, official: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    """The official result soupjax's ``name`` is compared with, and how it is labelled (None: none published)."""
    if name == "best_ingredient":
        best = max(official["individual"].values(), key=lambda r: r["ImageNet2p"])
        return f"official best on ImageNet2p ({best['model_name']}, {INDIVIDUAL})", best
    files = {"uniform": UNIFORM, "greedy": GREEDY, "ensemble": ENSEMBLE}
    if name in files and official.get(name) is not None:
        return f"official {OFFICIAL_OF[name]} ({files[name]})", official[name]
    return "", None


def soups_table(soups: Sequence[Mapping[str, Any]], official: Mapping[str, Any], shifts: Sequence[str]) -> list[str]:
    """Each soupjax row; under a row the official code published, the official row and the difference."""
    cols = columns(shifts)
    lines = ["| | " + " | ".join(headings(shifts)) + " |", "|---|" + "---:|" * len(cols)]
    for row in soups:
        ours = ours_numbers(row, shifts)
        lines.append(f"| soupjax {label(row)} | " + " | ".join(pct(ours[c]) for c in cols) + " |")
        what, theirs_row = official_row(row["name"], official)
        if theirs_row is None:
            continue
        theirs = official_numbers(theirs_row, shifts)
        lines.append(f"| {what} | " + " | ".join(pct(theirs[c]) for c in cols) + " |")
        # The held-out splits are other images, and we have no ObjectNet: no difference for either.
        lines.append("| difference (soupjax − official), points | " + " | ".join(
            "" if c in ("heldout", "ObjectNet") else diff(ours[c], theirs[c]) for c in cols) + " |")
    missing = [r["name"] for r in soups if official_row(r["name"], official)[1] is None]
    if missing:
        lines.append("")
        lines.append(f"No official numbers are published for {', '.join(missing)}: soupjax's only.")
    return lines


def ingredients_table(ingredients: Sequence[Mapping[str, Any]], official: Mapping[str, Any],
                      shifts: Sequence[str]) -> list[str]:
    """Each ingredient's ImageNet and mean-of-shifts accuracy, ours beside theirs, and a summary line."""
    lines = ["| ingredient | ImageNet, soupjax | official | difference | mean of shifts, soupjax | official | difference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    gaps: list[tuple[float, str]] = []
    for row in ingredients:
        theirs_row = official["individual"].get(row["name"])
        ours = ours_numbers(row, shifts)
        theirs = official_numbers(theirs_row, shifts) if theirs_row else {"ImageNet": None, "mean": None}
        if ours["ImageNet"] is not None and theirs["ImageNet"] is not None:
            gaps.append((ours["ImageNet"] - theirs["ImageNet"], row["name"]))
        lines.append(f"| {row['name']} | {pct(ours['ImageNet'])} | {pct(theirs['ImageNet'])} | "
                     f"{diff(ours['ImageNet'], theirs['ImageNet'])} | {pct(ours['mean'])} | {pct(theirs['mean'])} | "
                     f"{diff(ours['mean'], theirs['mean'])} |")
    if gaps:
        worst = max(gaps, key=lambda g: abs(g[0]))
        lines += ["", f"ImageNet, soupjax − official over {len(gaps)} ingredients: mean {100 * sum(g for g, _ in gaps) / len(gaps):+.2f} "
                  f"points, largest {100 * worst[0]:+.2f} ({worst[1]})."]
    unmatched = [r["name"] for r in ingredients if r["name"] not in official["individual"]]
    if unmatched:
        lines += ["", f"Not in {INDIVIDUAL}: {', '.join(unmatched)}."]
    return lines


def comparison(reports: Sequence[Path], checkout: Path) -> str:
    """The whole comparison as Markdown."""
    official = read_official(checkout)
    soups, ingredients, shifts = read_reports(reports)
    lines = ["# soupjax against the official model-soups results", "",
             f"Accuracies in %, differences in percentage points. Official: the results files of {checkout}.", "",
             *soups_table(soups, official, shifts), "", "## Each ingredient", "",
             *ingredients_table(ingredients, official, shifts), "", NOTES]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="soupjax report.json files (one per recipe)")
    parser.add_argument("--official", required=True, type=Path, help="a checkout of mlfoundations/model-soups")
    parser.add_argument("--out", type=Path, help="also write the comparison to this Markdown file")
    args = parser.parse_args(argv)
    try:
        text = comparison(args.reports, args.official)
    except CompareError as e:
        print(f"{PROGRAM}: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out)
    print(text, end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
