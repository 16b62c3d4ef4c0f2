"""Merges of K ingredients: soupjax's per-tensor streaming against whole models loaded into memory.

    python experiments/bench_merges.py --sizes vit-s/16 --ks 4,8 --repeats 3

For each model size (a `soupjax.models` name) the script writes max(K) + 1 synthetic ingredients with
`bench_soups.make_ingredients` (the model's random init plus float32 noise of std 0.01, each copy its
own seed) into a temporary directory that is removed at the end. The first copy is the merge's init
theta_0, the next K are the ingredients, so every displacement theta_i - theta_0 is random, of std
~0.014. Then, for each K and merge method, two variants run, each in a fresh process (its peak memory
is its own), interleaved over --repeats rounds with the order alternating round by round:

  soupjax  `merging.merge_by_tensor(tensor_source(init), [tensor_source(d) ...], combine)`: one tensor
           of each of the K ingredients and of the init is read from disk at a time and merged with
           `merging.ties` / `merging.task_arithmetic` (float64 working copies of that tensor).
  naive    what one writes without soupjax: `checkpoints.load_variables` of the init and all K
           ingredients (whole trees of numpy arrays in memory), then `jax.tree_util.tree_map` over
           the leaves, the K displacements `np.stack`ed into one [K, ...] float32 array per leaf:
           task arithmetic is `x0 + lam * taus.sum(0)`; TIES keeps each displacement's
           ceil(density * size) largest magnitudes of that tensor (the threshold from `np.partition`,
           entries >= it kept), elects the sign of the trimmed sum and takes the disjoint mean.

Methods: TIES (density --density, lambda --ties_lambda, default 0.2 and 1) and task arithmetic
(lambda --ta_lambda, default 0.3, which scales the SUM of the displacements).

Measured in each child, from the first open or load to the merged tree in memory: wall time
(perf_counter) and peak extra memory = VmHWM at the end minus VmRSS after the imports (Python, JAX,
orbax, TensorStore), read from /proc/self/status (a forked child's ru_maxrss would include its
parent's). The page cache is warm for every run (the files are read once before each size). The table
gives medians over the rounds and the ratio soupjax / naive of each. The two variants' merged trees
(saved by each child's first round, after its measurement) are compared: the maximum absolute
difference over all entries, how many entries differ by more than 1e-5 (a trimming decision taken
differently, not rounding) and the largest difference of the others. The naive TIES keeps every entry
whose |tau| equals its threshold, `merging.trim_top` exactly ceil(density * size) of them (ties to the
earlier index); float32 displacements are quantised, so a few exact ties at a threshold happen in a
model of this size, and the naive child counts the entries it kept beyond ceil(density * size).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# experiments/ is this script's directory, so on sys.path: reuse the soup benchmark's setup helpers.
from bench_soups import make_ingredients, mem_available_mb, warm

_CHILD = r"""
import json, math, sys, time
from pathlib import Path
import jax, numpy as np
from soupjax.io import checkpoints
from soupjax.arithmetic import merging

method, variant, root, k, save = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
density, ties_lam, ta_lam = float(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8])
dirs = sorted(p for p in root.iterdir() if p.name.startswith("ing"))
init_dir, ing_dirs = dirs[0], dirs[1:k + 1]
assert len(ing_dirs) == k, (len(ing_dirs), k)

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

tied = [0]

def naive_ties(x0, *xs):
    taus = np.stack(xs) - x0                       # [K, ...] float32
    flat = taus.reshape(len(xs), -1)
    n = flat.shape[1]
    keep = min(n, math.ceil(round(density * n, 9)))  # as merging.trim_top counts
    mag = np.abs(flat)
    kth = -np.partition(-mag, keep - 1, axis=1)[:, keep - 1:keep]  # each row's keep-th largest |tau|
    kept = mag >= kth
    tied[0] += int(kept.sum()) - len(xs) * keep  # entries tied with the threshold, kept beyond `keep`
    trimmed = np.where(kept, flat, np.float32(0))
    sign = np.sign(trimmed.sum(0))
    agree = (trimmed != 0) & (np.sign(trimmed) == sign)
    mean = np.where(agree, trimmed, np.float32(0)).sum(0) / np.maximum(agree.sum(0), 1)
    return (x0 + np.float32(ties_lam) * mean.reshape(x0.shape)).astype(np.float32)

def naive_ta(x0, *xs):
    return (x0 + np.float32(ta_lam) * (np.stack(xs) - x0).sum(0)).astype(np.float32)

if method == "ties":
    combine = lambda path, x0, xs: merging.ties(x0, xs, density, ties_lam)
    naive = naive_ties
elif method == "task_arithmetic":
    combine = lambda path, x0, xs: merging.task_arithmetic(x0, xs, ta_lam)
    naive = naive_ta
else:
    raise SystemExit(f"unknown method {method}")

start = status_mb("VmRSS")
t = time.perf_counter()
if variant == "soupjax":
    merged = merging.merge_by_tensor(checkpoints.tensor_source(init_dir),
                                     [checkpoints.tensor_source(d) for d in ing_dirs], combine)
elif variant == "naive":
    init = checkpoints.load_variables(init_dir)
    trees = [checkpoints.load_variables(d) for d in ing_dirs]
    assert set(init) == {"params"}, sorted(init)  # every leaf is a merged parameter, as in merge_by_tensor
    merged = jax.tree_util.tree_map(naive, init, *trees)
    del init, trees
else:
    raise SystemExit(f"unknown variant {variant}")
seconds = time.perf_counter() - t
peak = status_mb("VmHWM")
if save:
    leaves = jax.tree_util.tree_leaves_with_path(merged)
    np.savez(save, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
print(json.dumps({"seconds": seconds, "peak_mb": peak, "start_mb": start, "tied": tied[0]}))
"""

VARIANTS = ("soupjax", "naive")


def run_child(method: str, variant: str, root: Path, k: int, save: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-c", _CHILD, method, variant, str(root), str(k), save,
           str(args.density), str(args.ties_lambda), str(args.ta_lambda)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{method} {variant} K={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(a: str, b: str) -> tuple[float, int, int, float]:
    """(max |a - b|, entries with |a - b| > 1e-5, entries, max |a - b| of the others) over two saved trees."""
    import numpy as np
    with np.load(a) as fa, np.load(b) as fb:
        assert sorted(fa.files) == sorted(fb.files)
        worst, off, total, rest = 0.0, 0, 0, 0.0
        for name in fa.files:
            x, y = fa[name], fb[name]
            assert x.shape == y.shape and x.dtype == y.dtype == np.float32, (name, x.shape, y.shape, x.dtype, y.dtype)
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            worst = max(worst, float(d.max()))
            off += int((d > 1e-5).sum())
            rest = max(rest, float(d[d <= 1e-5].max(initial=0.0)))
            total += d.size
    return worst, off, total, rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="vit-s/16", help="comma-separated soupjax.models names")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--methods", default="ties,task_arithmetic")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per (size, K, method): soupjax, naive each")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--ties_lambda", type=float, default=1.0)
    parser.add_argument("--ta_lambda", type=float, default=0.3)
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    ks = sorted(int(x) for x in args.ks.split(","))
    methods = [m for m in args.methods.split(",") if m]

    print("$ " + " ".join(["python", *sys.argv]))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}: {os.cpu_count()} CPUs, "
          f"{mem_available_mb() / 1024:.1f} GiB available, shared with other jobs while measuring")
    print(f"TIES density {args.density}, lambda {args.ties_lambda}; task arithmetic lambda {args.ta_lambda} "
          f"(on the sum); {args.repeats} rounds, soupjax and naive alternating first; page cache warm", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_merges-") as tmp:
        for size in sizes:
            root = Path(tmp) / size.replace("/", "_")
            root.mkdir()
            nbytes, made_s = make_ingredients(root, size, max(ks) + 1, args.image_size)
            model_mb = nbytes / 2**20
            print(f"\n{size}: one model is {model_mb:.1f} MiB of float32 ({nbytes // 4 / 1e6:.1f}M parameters); "
                  f"init + {max(ks)} ingredients written in {made_s:.0f} s", flush=True)
            warm(root, max(ks) + 1)
            for k in ks:
                for method in methods:
                    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
                    saved = {v: str(Path(tmp) / f"merged-{v}.npz") for v in VARIANTS}
                    for rep in range(args.repeats):
                        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
                        for variant in order:
                            r = run_child(method, variant, root, k, saved[variant] if rep == 0 else "", args)
                            runs[variant].append(r)
                            print(f"  {size} K={k} {method:<16} {variant:<7} round {rep + 1}: {r['seconds']:6.2f} s, "
                                  f"peak extra {r['peak_mb'] - r['start_mb']:6.0f} MiB "
                                  f"(VmHWM {r['peak_mb']:.0f}, after imports {r['start_mb']:.0f})", flush=True)
                    worst, off, total, rest = compare(saved["soupjax"], saved["naive"])
                    tied = runs["naive"][0]["tied"]
                    for path in saved.values():
                        os.remove(path)
                    print(f"  {size} K={k} {method}: soupjax vs naive max |diff| {worst:.2e}; {off} of {total} "
                          f"entries differ by > 1e-5, the others by at most {rest:.2e}"
                          + (f"; the naive TIES kept {tied} entries tied in |tau| with its threshold beyond the "
                             f"top ceil(density * size), where merging.trim_top keeps the first in index order"
                             if method == "ties" else ""), flush=True)
                    med = {v: (statistics.median(r["seconds"] for r in rs),
                               statistics.median(r["peak_mb"] - r["start_mb"] for r in rs)) for v, rs in runs.items()}
                    rows.append((size, model_mb, method, k, med, worst))

    print()
    print("medians over the rounds; peak extra = VmHWM at the end - VmRSS after imports; "
          "ratio = soupjax / naive")
    print(f"{'model':<9} {'method':<16} {'K':>2} {'variant':<7} {'time s':>7} {'peak extra MiB':>14} "
          f"{'in models':>9} {'time ratio':>10} {'memory ratio':>12} {'max |diff|':>10}")
    for size, model_mb, method, k, med, worst in rows:
        for variant in VARIANTS:
            s, m = med[variant]
            ratios = (f"{med['soupjax'][0] / med['naive'][0]:>10.2f} {med['soupjax'][1] / med['naive'][1]:>12.2f} "
                      f"{worst:>10.1e}" if variant == "soupjax" else "")
            print(f"{size:<9} {method:<16} {k:>2} {variant:<7} {s:>7.2f} {m:>14.0f} {m / model_mb:>9.2f} {ratios}")


if __name__ == "__main__":
    main()
