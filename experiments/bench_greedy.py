"""Greedy soup wall time: soupjax against the official model-soups greedy loop in PyTorch.

    python experiments/bench_greedy.py --ks 8,16 --heldout 2000 --rounds 3
    python experiments/bench_greedy.py --ingredients runs/soupjax/ingredients --ks 8   # real ones

The issue's target (issue 8, "Speed", section 3): soupjax at least 1.5x faster than the official
code, for K = 8 and 16 ingredients, on a held-out split of at least 2,000 images.

Setup (not timed):
  * Ingredients. By default K synthetic ingredients of the study's default ViT
    (configs/fashion_mnist_vit.py:stage=downstream: width 96, depth 4, 4 heads, 4x4 patches, 28x28x1,
    5 classes): one init plus a different small random perturbation each, saved with
    `soupjax.io.checkpoints.save_ingredient` (meta.json: init fingerprint, config, and the held-out
    accuracy measured below, as training writes it). `--ingredients DIR` uses finished ones instead.
    The same weights are exported to one timm `.pt` state dict per ingredient
    (`soupjax.importers.timm_export`), as the official code keeps its ingredients.
  * Held-out images. The config's held-out split through soupjax's own pipeline
    (`soupjax.data.eval_batches`, Debian's Fashion-MNIST), decoded once into memory; the first
    `--heldout` images. Both sides get exactly these images and labels at the config's evaluation
    batch size (64): soupjax as the pipeline's padded, masked batches, PyTorch as NCHW tensors with
    a smaller last batch, as a DataLoader gives it.
  * Compilation. The JAX evaluator and the soup arithmetic are compiled once before timing (their
    compile time is printed, and excluded from the timings); PyTorch gets the same warm-up passes.
    The synthetic ingredients' held-out accuracies are measured with the soupjax evaluator then, and
    the PyTorch model's accuracy and logits on the same ingredient are checked against it.

Timed, interleaved over `--rounds` (soupjax, PyTorch, soupjax, PyTorch, ...), for each K:
  soupjax   what `python -m soupjax.soup --recipe greedy` does: scores from each meta.json,
            `checkpoints.ingredient_loader` per ingredient, `soups.greedy` with an evaluator built
            as `soupjax.cooking.evaluations.Evaluations.heldout_accuracy` (an `evaluate.Evaluator` over the held-out
            batches), until the soup's arrays are ready.
  PyTorch   the greedy loop of mlfoundations/model-soups `main.py`, rewritten from its description:
            ingredients sorted by held-out accuracy; the soup starts as the best one's state dict;
            for each next one, `torch.load` it from disk, form the candidate
            `{k: soup[k] * n/(n+1) + new[k] / (n+1)}`, `model.load_state_dict` it into a timm
            VisionTransformer, evaluate it on the whole held-out set in eval mode under
            `torch.inference_mode()` (`.item()` per batch, as the official evaluation), and keep it
            when held-out accuracy does not fall (`>=`, soupjax's and the paper's rule; the official
            code uses `>`, which `--strict` selects for both sides).
Prints the median seconds of each side, the ratio PyTorch / soupjax, where each side's time goes
(loading, soup arithmetic, evaluation), and whether both picked the same ingredients (float32
differences between the two frameworks can flip an argmax, hence a tie, hence a decision).

PyTorch's CPU thread count is the fastest of 1..cpu_count on a warm-up pass unless `--torch_threads`
says otherwise (on a busy 2-core machine OpenMP's 2 threads can be 3x slower than 1), so the
comparison is against the best PyTorch configuration found; JAX keeps its defaults. On a GPU
machine PyTorch runs on CUDA when JAX does (`--torch_device`).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything can load TensorFlow

# PyTorch and timm are imported before TensorFlow (soupjax.data): timm pulls in triton, and loading
# triton after TensorFlow's libraries segfaults (see tests/conftest.py).
import torch  # noqa: E402,I001
import timm  # noqa: E402,F401

import argparse
import dataclasses
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "fashion_mnist_vit.py") + ":stage=downstream"


# ------------------------------------------------------------------------------------------ setup


def load_config(spec: str):
    """`path/to/config.py[:options]` -> `get_config(options)`, as ml_collections' config flags do."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def heldout_arrays(config, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` real held-out images (NHWC float32, preprocessed) and labels, decoded once."""
    from soupjax import data
    images, labels, have = [], [], 0
    for batch in data.eval_batches(config.data, "heldout", batch_size):
        real = np.asarray(batch["mask"]) > 0
        images.append(np.asarray(batch["image"])[real])
        labels.append(np.asarray(batch["label"])[real])
        have += int(real.sum())
        if have >= n:
            break
    if have < n:
        raise SystemExit(f"the held-out split has only {have} images; ask for --heldout {have} or fewer")
    return np.concatenate(images)[:n].astype(np.float32), np.concatenate(labels)[:n].astype(np.int32)


def jax_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """soupjax's evaluation batches: fixed size, the last one padded with zero images and mask 0."""
    out = []
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(y)
        out.append({"image": np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]),
                    "label": np.concatenate([y, np.zeros(pad, y.dtype)]),
                    "mask": np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])})
    return out


def torch_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device: str):
    """The same images as NCHW tensors, batched as a DataLoader (shuffle=False) batches them."""
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    return [(nchw[s:s + batch_size].to(device), y[s:s + batch_size].to(device))
            for s in range(0, len(labels), batch_size)]


def make_synthetic(root: Path, config, k: int, seed: int) -> list[Path]:
    """K ingredients: the model's init plus a different small Gaussian perturbation each.

    Their held-out accuracies are filled in later (`record_heldout`), once the evaluator exists.
    """
    import jax
    import jax.numpy as jnp
    from soupjax.io import checkpoints
    from soupjax.models import build_model_from_run_config as build_model
    from soupjax.importers.fingerprint import weights_fingerprint as fingerprint
    from soupjax.training.shared_init import input_shape
    model = build_model(config)
    shape = input_shape(config)
    init = jax.device_get(jax.jit(lambda r: model.init(r, jnp.zeros(shape, jnp.float32), train=False))(
        jax.random.key(seed, impl="rbg")))
    init = {"params": init["params"]}
    init_fp = fingerprint(init)
    paths = []
    for i in range(k):
        rng = np.random.default_rng([seed, i])
        sigma = 0.01 * (1 + i % 4)  # ingredients that differ, and by different amounts
        variables = jax.tree_util.tree_map(
            lambda x: (x + sigma * rng.standard_normal(x.shape)).astype(x.dtype), init)
        meta = {"name": f"ing{i:02d}", "init_fingerprint": init_fp, "config": config.to_dict(),
                "synthetic": {"seed": seed, "index": i, "sigma": sigma},
                "metrics": {"heldout": {"accuracy": None}}}
        paths.append(checkpoints.save_ingredient(root / f"ing{i:02d}", variables, meta))
    return paths


def record_heldout(paths: list[Path], heldout_accuracy: Callable[[Any], float], n: int) -> None:
    """Writes each synthetic ingredient's held-out accuracy into its meta.json, as training does."""
    from soupjax.io import checkpoints
    from soupjax.io import files
    for path in paths:
        meta = checkpoints.load_meta(path)
        meta["metrics"]["heldout"] = {"accuracy": heldout_accuracy(checkpoints.load_variables(path)),
                                      "num_examples": n}
        files.write_json_atomic(path / checkpoints.META_FILE, meta)


def export_torch(paths: list[Path], out: Path) -> list[Path]:
    """One timm state dict per ingredient (`NAME.pt`), the file layout of the official code."""
    from soupjax.io import checkpoints
    from soupjax.importers.timm_export import save_timm_state_dict
    out.mkdir(parents=True, exist_ok=True)
    return [save_timm_state_dict(checkpoints.load_variables(p), out / f"{p.name}.pt") for p in paths]


# ------------------------------------------------------------------------------------------ the two sides


@dataclasses.dataclass
class Run:
    seconds: float
    parts: dict[str, float]
    picked: list[str]
    heldout: float


def soupjax_greedy(paths: list[Path], evaluate: Callable[[Any], float], strict: bool) -> Run:
    """`soupjax.soup --recipe greedy`'s work: scores from meta.json, streamed loaders, soups.greedy."""
    import jax
    from soupjax.io import checkpoints
    from soupjax.arithmetic import soups
    parts = {"load": 0.0, "eval": 0.0}

    def timed(fn: Callable, part: str) -> Callable:
        def run(*args):
            t = time.perf_counter()
            out = fn(*args)
            parts[part] += time.perf_counter() - t
            return out
        return run

    start = time.perf_counter()
    scores = [checkpoints.load_meta(p)["metrics"]["heldout"]["accuracy"] for p in paths]
    loaders = [timed(checkpoints.ingredient_loader(p), "load") for p in paths]
    result = soups.greedy(loaders, scores, timed(evaluate, "eval"), strict=strict)
    jax.block_until_ready(result.variables)
    seconds = time.perf_counter() - start
    parts["soup arithmetic + rest"] = seconds - parts["load"] - parts["eval"]
    return Run(seconds, parts, [paths[i].name for i in result.used], result.heldout)


def torch_accuracy(model: torch.nn.Module, batches) -> float:
    """Top-1 accuracy on the whole held-out set, as the official `test_model_on_dataset`."""
    model.eval()
    correct, n = 0, 0
    with torch.inference_mode():
        for images, labels in batches:
            logits = model(images)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            n += labels.size(0)
    return correct / n


def torch_greedy(pt_files: list[Path], meta_dirs: list[Path], model: torch.nn.Module, batches,
                 device: str, strict: bool) -> Run:
    """The official greedy loop: sorted by held-out accuracy, one state dict at a time from disk."""
    parts = {"load": 0.0, "average": 0.0, "load_state_dict": 0.0, "eval": 0.0}
    start = time.perf_counter()
    scores = {}
    for pt, d in zip(pt_files, meta_dirs):  # the official code reads them from its results file
        scores[pt] = json.loads((d / "meta.json").read_text())["metrics"]["heldout"]["accuracy"]
    ranked = sorted(pt_files, key=lambda p: -scores[p])  # stable: ties keep index order

    def load(path: Path) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        sd = torch.load(path, map_location=device, weights_only=True)
        parts["load"] += time.perf_counter() - t
        return sd

    soup = load(ranked[0])
    ingredients = [ranked[0]]
    best = scores[ranked[0]]
    for path in ranked[1:]:
        new = load(path)
        n = len(ingredients)
        t = time.perf_counter()
        candidate = {k: soup[k] * (n / (n + 1.0)) + new[k] * (1.0 / (n + 1)) for k in new}
        parts["average"] += time.perf_counter() - t
        t = time.perf_counter()
        model.load_state_dict(candidate)
        parts["load_state_dict"] += time.perf_counter() - t
        t = time.perf_counter()
        accuracy = torch_accuracy(model, batches)
        parts["eval"] += time.perf_counter() - t
        if accuracy > best or (not strict and accuracy == best):
            ingredients.append(path)
            best = accuracy
            soup = candidate
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    parts["rest"] = seconds - sum(parts.values())
    return Run(seconds, parts, [p.stem for p in ingredients], best)


def pick_torch_threads(model: torch.nn.Module, batches, requested: int) -> tuple[int, dict[int, float]]:
    """`requested`, or the thread count with the fastest warm pass over a few batches (0 = auto)."""
    if requested:
        torch.set_num_threads(requested)
        return requested, {}
    timings = {}
    for threads in range(1, (os.cpu_count() or 1) + 1):
        torch.set_num_threads(threads)
        torch_accuracy(model, batches[:2])
        t = time.perf_counter()
        torch_accuracy(model, batches[:8])
        timings[threads] = (time.perf_counter() - t) / len(batches[:8])
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best, timings


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="8,16", help="numbers of ingredients, comma-separated")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out images (the first N of the split)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, interleaved")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:options] (synthetic ingredients)")
    parser.add_argument("--ingredients", default=None, help="use the finished ingredients in DIR instead")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=0, help="evaluation batch size (default: the config's)")
    parser.add_argument("--strict", action="store_true", help="add only when held-out accuracy rises (>)")
    parser.add_argument("--torch_threads", type=int, default=0, help="0: the fastest of 1..cpu_count")
    parser.add_argument("--torch_device", default="auto", help="'auto' (CUDA when JAX runs on a GPU), 'cpu', 'cuda'")
    parser.add_argument("--workdir", default=None, help="where ingredients and .pt files go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ks = sorted({int(k) for k in args.ks.split(",")})
    t_script = time.perf_counter()

    import jax
    from ml_collections import ConfigDict
    from soupjax.io import checkpoints
    from soupjax.evaluation import evaluate
    from soupjax.cooking import preflight
    from soupjax.devices import sharding
    from soupjax.models import build_model_from_run_config as build_model
    from soupjax.importers.timm_export import timm_vit_kwargs
    from soupjax.evaluation.evaluate import apply_for_eval

    device = args.torch_device
    if device == "auto":
        device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_greedy-")).absolute()
    load = os.getloadavg()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    print(f"jax {jax.__version__} ({jax.default_backend()}: {', '.join(str(d) for d in jax.devices())}); "
          f"torch {torch.__version__} on {device}; timm {timm.__version__}; python {platform.python_version()}")

    # Ingredients and config.
    if args.ingredients:
        found = preflight.gather(Path(args.ingredients))
        paths = [ing.path for ing in found]
        config = ConfigDict(found[0].meta["config"]) if args.config == DEFAULT_CONFIG else load_config(args.config)
        if len(paths) < max(ks):
            raise SystemExit(f"{args.ingredients} holds {len(paths)} ingredients, fewer than K = {max(ks)}")
    else:
        config = load_config(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    batch_size = args.batch_size or config.eval_batch_size

    t = time.perf_counter()
    images, labels = heldout_arrays(config, args.heldout, batch_size)
    jbatches = jax_batches(images, labels, batch_size)
    print(f"held-out: {len(labels)} images of {config.data.name} ({config.data.image_size}x"
          f"{config.data.image_size}x{config.data.channels}, classes {list(config.data.get('classes') or [])}), "
          f"batch {batch_size}, decoded once in {time.perf_counter() - t:.1f} s")

    # The evaluator, built as soupjax.cooking.evaluations.Evaluations builds it.
    model = build_model(config)
    evaluator = evaluate.Evaluator(apply_for_eval(model), sharding.data_mesh())

    def heldout_accuracy(variables) -> float:
        return evaluator(variables, iter(jbatches)).accuracy

    if not args.ingredients:
        t = time.perf_counter()
        paths = make_synthetic(workdir / "ingredients", config, max(ks), args.seed)
        print(f"ingredients: {len(paths)} synthetic ({config.model.to_dict()}), written in "
              f"{time.perf_counter() - t:.1f} s to {workdir / 'ingredients'}")
    first = checkpoints.load_variables(paths[0])
    t = time.perf_counter()
    heldout_accuracy(first)
    first_call = time.perf_counter() - t
    t = time.perf_counter()
    jax_acc = heldout_accuracy(first)
    warm_call = time.perf_counter() - t
    print(f"JAX evaluator: first call {first_call:.2f} s, warm call {warm_call:.2f} s: compile about "
          f"{first_call - warm_call:.2f} s (done once here, excluded from the timings below)")
    if not args.ingredients:
        t = time.perf_counter()
        record_heldout(paths, heldout_accuracy, len(labels))
        print(f"measured each synthetic ingredient's held-out accuracy (soupjax evaluator) in "
              f"{time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    from soupjax.arithmetic import soups
    scores = [checkpoints.load_meta(p)["metrics"]["heldout"]["accuracy"] for p in paths]
    soups.greedy([checkpoints.ingredient_loader(p) for p in paths[:2]], scores[:2], heldout_accuracy)
    print(f"soup arithmetic compiled by a K=2 greedy soup ({time.perf_counter() - t:.2f} s, not timed)")

    t = time.perf_counter()
    pt_files = export_torch(paths, workdir / "torch")
    print(f"exported {len(pt_files)} timm state dicts ({pt_files[0].stat().st_size / 2**20:.2f} MiB each) in "
          f"{time.perf_counter() - t:.1f} s to {workdir / 'torch'}")

    # The PyTorch model; parity with soupjax on one ingredient, and the thread count.
    tmodel = timm.models.vision_transformer.VisionTransformer(**timm_vit_kwargs(first)).to(device).eval()
    tmodel.load_state_dict(torch.load(pt_files[0], map_location=device, weights_only=True), strict=True)
    tbatches = torch_batches(images, labels, batch_size, device)
    threads, probe = pick_torch_threads(tmodel, tbatches, args.torch_threads) if device == "cpu" else (
        torch.get_num_threads(), {})
    if probe:
        print("torch threads: " + ", ".join(f"{n}: {s * 1e3:.0f} ms/batch" for n, s in probe.items())
              + f" -> {threads}")
    torch_acc = torch_accuracy(tmodel, tbatches)
    with torch.inference_mode():
        theirs = tmodel(tbatches[0][0]).cpu().numpy()
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(first, jbatches[0]["image"]))
    print(f"parity on {paths[0].name}: held-out accuracy soupjax {jax_acc:.4f} / torch "
          f"{torch_acc:.4f}; max |logit difference| on a batch {np.abs(ours - theirs).max():.1e}")
    del first

    # Timed rounds, interleaved.
    runs: dict[tuple[str, int], list[Run]] = {}
    for r in range(args.rounds):
        for k in ks:
            for side in ("soupjax", "torch"):
                if side == "soupjax":
                    run = soupjax_greedy(paths[:k], heldout_accuracy, args.strict)
                else:
                    run = torch_greedy(pt_files[:k], paths[:k], tmodel, tbatches, device, args.strict)
                runs.setdefault((side, k), []).append(run)
                print(f"round {r + 1} K={k:2d} {side:7s} {run.seconds:7.2f} s  picked {len(run.picked)}: "
                      f"{','.join(run.picked)}  held-out {run.heldout:.4f}", flush=True)

    median = lambda xs: statistics.median(xs)  # noqa: E731
    print()
    print(f"Greedy soup, {len(labels)} held-out images, batch {batch_size}, {args.rounds} rounds, median "
          f"seconds (JAX compile excluded; torch {threads} thread(s) on {device})")
    verdicts = []
    print("| K | soupjax s | torch s | torch / soupjax | evaluations | same ingredients |")
    print("|---:|---:|---:|---:|---:|:---|")
    for k in ks:
        js, ts = runs[("soupjax", k)], runs[("torch", k)]
        j, tt = median([x.seconds for x in js]), median([x.seconds for x in ts])
        same = all(a.picked == b.picked for a, b in zip(js, ts))
        print(f"| {k} | {j:.2f} | {tt:.2f} | **{tt / j:.2f}x** | {k - 1} | "
              f"{'yes' if same else 'NO'} |")
        verdicts.append(f"K={k} {'met' if tt / j >= 1.5 else 'NOT met'} ({tt / j:.2f}x)")
    print(f"issue 8 target (soupjax >= 1.5x faster, >= 2,000 held-out images"
          f"{'' if len(labels) >= 2000 else ': too few images here'}): " + "; ".join(verdicts))
    print()
    for k in ks:
        for side in ("soupjax", "torch"):
            rs = runs[(side, k)]
            parts = {p: median([x.parts[p] for x in rs]) for p in rs[0].parts}
            evals = k - 1
            print(f"K={k:2d} {side:7s} where the time goes (median s): "
                  + ", ".join(f"{p} {s:.2f}" for p, s in parts.items())
                  + f"; per evaluation {parts['eval'] / evals:.3f} s, per load {parts['load'] / k * 1e3:.1f} ms")
    for k in ks:
        js, ts = runs[("soupjax", k)], runs[("torch", k)]
        if not all(a.picked == b.picked for a, b in zip(js, ts)):
            print(f"WARNING: K={k}: the two sides picked different ingredients (soupjax {js[0].picked}, "
                  f"torch {ts[0].picked}); float32 differences between the frameworks can flip an argmax "
                  "and so a tie in held-out accuracy")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; whole script "
          f"{time.perf_counter() - t_script:.0f} s; files in {workdir}")
    if not args.workdir:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
