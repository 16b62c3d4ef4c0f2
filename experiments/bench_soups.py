"""Memory and time of a uniform soup: per tensor, per ingredient and all at once, against the read time.

    JAX_PLATFORMS=cpu python experiments/bench_soups.py --model vit-b/16 --ks 1,4,16,32 --root /tmp/soupbench

Writes max(K) synthetic ingredients (the model's init plus noise, float32) as soupjax ingredients into
``--root`` (reused when there already, so a rerun does not write ~10 GB again; default: a temporary
directory removed at the end), then, for each K, cooks the uniform soup of the first K, each method in a
fresh process so that its peak resident memory (VmHWM) is its own:

  per_tensor   soup_arithmetic.uniform_by_tensor over checkpoints.tensor_source: one tensor of each ingredient at a
               time into a float32 accumulator of that tensor's size (how the soup CLI cooks it);
  streamed     soup_arithmetic.uniform over checkpoints.ingredient_loader: one whole ingredient at a time into a
               float32 running sum of the whole model;
  load_all     what one writes without soupjax: load all K, then tree_map a mean over them (skipped where
               K models would not fit in the memory available at that moment, or above --load_all_max_k);
  read_whole   the time only to read the same files, whole (checkpoints.load_variables), no arithmetic;
  read_tensor  the time only to read the same files, per tensor: the per_tensor soup's own reads
               (engine.reads: the same threads, buffers, order and prefetch budget), no arithmetic.

The methods of one K run back to back, in an order that rotates with each repeat (so a slow spell of a
shared machine does not favour one method), after the K ingredients' files were read once: every method
reads from a warm page cache. The methods the targets are about (--repeat_methods: per_tensor and the
two reads) run --repeats times, the slower baselines once; wall time is the best run, peak the largest.
"read" in the ratios is the faster of the two read-only methods at that K. Peak memory is given as it
is (the whole process, with the ~0.22 GB of Python, JAX, orbax and TensorStore in it) and as growth over
the process after its imports, both also as a multiple of one model. (Peak is the child's VmHWM, not
ru_maxrss: a child's ru_maxrss includes the memory of the parent it was forked from, which is what the
peaks of the earlier version of this benchmark were.) The soups of all methods are checked to agree to
float32 rounding (per-leaf sums; load_all is numpy's pairwise float32 mean), and per_tensor and
streamed are compared bit for bit (a hash of every byte).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import hashlib, json, os, sys, time
from pathlib import Path
import jax, numpy as np
from soupjax.io import checkpoints
from soupjax.arithmetic import soups as soup_arithmetic
method, root, k = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
paths = checkpoints.list_ingredients(root)[:k]
assert len(paths) == k, (len(paths), k)

def status_mb(field):  # this process's own memory: ru_maxrss would include the parent's, inherited at fork
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

start = status_mb("VmRSS")
t = time.perf_counter()
soup = None
if method == "per_tensor":
    soup = soup_arithmetic.uniform_by_tensor([checkpoints.tensor_source(p) for p in paths])
elif method == "streamed":
    soup = jax.device_get(soup_arithmetic.uniform([checkpoints.ingredient_loader(p) for p in paths]))
elif method == "load_all":
    trees = [checkpoints.load_variables(p) for p in paths]
    soup = jax.tree_util.tree_map(lambda *xs: np.mean(np.stack(xs), axis=0), *trees)
    del trees
elif method == "read_whole":
    for p in paths:
        tree = checkpoints.load_variables(p)
        del tree
elif method == "read_tensor":  # the per_tensor soup's own reads (threads, buffers, order), no arithmetic
    from soupjax.arithmetic import engine
    from soupjax.io.trees import Layout
    sources = [checkpoints.tensor_source(p) for p in paths]
    layout = Layout.of(sources[0].structure)[0]
    plan = [[engine.Read(src, src.name, dtype) for src in sources] for dtype in layout.dtypes]
    for x, _ in engine.reads(layout, plan):  # the engine's default threads and prefetch budget
        pass
else:
    raise SystemExit(f"unknown method {method}")
seconds = time.perf_counter() - t
out = {"seconds": seconds, "peak_mb": status_mb("VmHWM"), "start_mb": start}
if soup is not None:
    leaves = jax.tree_util.tree_leaves_with_path(soup)
    out["sha"] = hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for _, x in leaves)).hexdigest()[:16]
    out["sums"] = [float(np.asarray(x, np.float64).sum()) for _, x in leaves]
    out["abs_sums"] = [float(np.abs(np.asarray(x, np.float64)).sum()) for _, x in leaves]
    out["dtypes"] = sorted({str(np.asarray(x).dtype) for _, x in leaves})
print(json.dumps(out))
"""

METHODS = ("per_tensor", "streamed", "load_all", "read_whole", "read_tensor")
READS = ("read_whole", "read_tensor")


def make_ingredients(root: Path, model_name: str, k: int, image_size: int) -> tuple[int, float]:
    """``k`` ingredients of ``model_name`` under ``root`` (kept when already there); (model bytes, seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax import models
    from soupjax.io import checkpoints
    t = time.perf_counter()
    meta = {"bench_model": model_name, "image_size": image_size, "init_fingerprint": "bench"}
    model = models.get_model(model_name, 10)
    variables = jax.device_get(jax.jit(lambda r: model.init(r, jnp.zeros((1, image_size, image_size, 3))))(
        jax.random.PRNGKey(0)))
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))
    for i in range(k):
        directory = root / f"ing{i:02d}"
        if checkpoints.is_ingredient(directory) and checkpoints.load_meta(directory).get("bench_seed") == i \
                and all(checkpoints.load_meta(directory).get(key) == value for key, value in meta.items()):
            continue
        rng = np.random.default_rng(i)
        noisy = jax.tree_util.tree_map(
            lambda x: (x + 0.01 * rng.standard_normal(x.shape, dtype=np.float32)).astype(x.dtype), variables)
        checkpoints.save_ingredient(directory, noisy, {**meta, "bench_seed": i})
        del noisy
    return size, time.perf_counter() - t


def warm(root: Path, k: int) -> float:
    """Read the first ``k`` ingredients' files once, so that every method reads from the page cache."""
    t = time.perf_counter()
    for directory in sorted(p for p in root.iterdir() if p.name.startswith("ing"))[:k]:
        for f in sorted(directory.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
    return time.perf_counter() - t


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def run_child(method: str, root: Path, k: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", _CHILD, method, str(root), str(k)], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise SystemExit(f"{method} K={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_soups(k: int, results: dict[str, dict]) -> str:
    soups = {m: r for m, r in results.items() if "sha" in r}
    notes = []
    if "per_tensor" in soups and "streamed" in soups:
        same = soups["per_tensor"]["sha"] == soups["streamed"]["sha"]
        notes.append("per_tensor == streamed bit for bit" if same else "per_tensor != streamed bitwise")
    ref = soups.get("per_tensor") or next(iter(soups.values()))
    for method, r in soups.items():
        assert r["dtypes"] == ref["dtypes"], (method, r["dtypes"], ref["dtypes"])
        rel = max(abs(a - b) / max(1.0, c) for a, b, c in zip(r["sums"], ref["sums"], ref["abs_sums"]))
        assert rel < 1e-5, f"K={k}: the {method} soup differs from per_tensor (relative {rel:.2e})"
        if method != "per_tensor":
            notes.append(f"{method} leaf sums within {rel:.1e}")
    return "; ".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--ks", default="1,4,16,32")
    parser.add_argument("--root", default="", help="where the ingredients are written (and reused); default a temp dir")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=2, help="runs per K of --repeat_methods; the best time is kept")
    parser.add_argument("--repeat_methods", default="per_tensor,read_tensor,read_whole",
                        help="the methods run --repeats times (the targets' numerator and denominators); "
                             "the others run once, to keep the whole benchmark short")
    parser.add_argument("--load_all_max_k", type=int, default=1 << 30, help="skip load_all above this K")
    args = parser.parse_args()
    ks = sorted(int(x) for x in args.ks.split(","))
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {METHODS}")

    tmp = None
    if args.root:
        root = Path(args.root).absolute() / args.model.replace("/", "_")
    else:
        tmp = tempfile.mkdtemp(prefix="bench_soups-")
        root = Path(tmp) / args.model.replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    try:
        size, seconds = make_ingredients(root, args.model, max(ks), args.image_size)
        model_mb = size / 2**20
        print("$ " + " ".join(["python", *sys.argv]))
        print(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}: {os.cpu_count()} CPUs, "
              f"{mem_available_mb() / 1024:.1f} GiB available, shared with other users while measuring")
        print(f"model {args.model}: one ingredient is {model_mb:.0f} MiB of float32; {max(ks)} ingredients in "
              f"{root} (written or checked in {seconds:.0f} s)")
        print("page cache: warm for every method (the K ingredients' files are read once before each K)")
        print(f"repeats: {args.repeats} of {args.repeat_methods}, 1 of the others; the methods of one K back to "
              f"back, in an order that rotates with each repeat; wall = best, peak = largest", flush=True)
        rows = []
        for k in ks:
            warm_s = warm(root, k)
            todo = list(methods)
            if "load_all" in todo:
                need = (k + 1) * model_mb + 1024
                if k > args.load_all_max_k or need > 0.8 * mem_available_mb():
                    todo.remove("load_all")
                    print(f"K={k}: load_all skipped (needs ~{need / 1024:.1f} GiB; "
                          f"{mem_available_mb() / 1024:.1f} GiB available; --load_all_max_k {args.load_all_max_k})")
            results: dict[str, dict] = {}
            repeated = [m for m in args.repeat_methods.split(",") if m]
            for rep in range(args.repeats):
                this = todo if rep == 0 else [m for m in todo if m in repeated]
                if not this:
                    break
                order = this[rep % len(this):] + this[:rep % len(this)]
                for method in order:
                    r = run_child(method, root, k)
                    best = results.get(method)
                    if best is None:
                        results[method] = r
                    else:
                        best["seconds"] = min(best["seconds"], r["seconds"])
                        best["peak_mb"] = max(best["peak_mb"], r["peak_mb"])
                        best["start_mb"] = min(best["start_mb"], r["start_mb"])
                    print(f"  K={k:<3} {method:<11} {r['seconds']:7.2f} s  peak {r['peak_mb']:6.0f} MiB", flush=True)
            note = check_soups(k, results)
            print(f"K={k}: cache warmed in {warm_s:.1f} s; soups agree: {note}", flush=True)
            read_s = min((results[m]["seconds"] for m in READS if m in results), default=float("nan"))
            for method in methods:
                if method in results:
                    rows.append((k, method, results[method], read_s))
        print()
        print(f"one model = {model_mb:.0f} MiB; read = the faster of read_whole and read_tensor at that K; "
              f"growth = peak - RSS after imports")
        print(f"{'K':>3} {'method':>11} {'wall s':>7} {'wall/read':>9} {'peak MiB':>9} {'peak/model':>10} "
              f"{'growth MiB':>10} {'growth/model':>12}")
        for k, method, r, read_s in rows:
            growth = r["peak_mb"] - r["start_mb"]
            print(f"{k:>3} {method:>11} {r['seconds']:>7.2f} {r['seconds'] / read_s:>9.2f} {r['peak_mb']:>9.0f} "
                  f"{r['peak_mb'] / model_mb:>10.2f} {growth:>10.0f} {growth / model_mb:>12.2f}")
        print()
        print("targets for per_tensor (memory within 1.5 models, wall within 1.5 x read):")
        for k, method, r, read_s in rows:
            if method == "per_tensor":
                growth, peak, ratio = ((r["peak_mb"] - r["start_mb"]) / model_mb, r["peak_mb"] / model_mb,
                                       r["seconds"] / read_s)
                print(f"  K={k:<3} growth/model {growth:.2f} {'met' if growth <= 1.5 else 'MISSED'}; "
                      f"peak/model {peak:.2f} {'met' if peak <= 1.5 else 'MISSED'} (with the runtime's "
                      f"{r['start_mb']:.0f} MiB); wall/read {ratio:.2f} {'met' if ratio <= 1.5 else 'MISSED'}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
