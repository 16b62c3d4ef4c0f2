"""Learned soup: seconds per epoch and peak memory against K, ingredients held on the host or streamed from disk.

    python experiments/bench_learned.py --ks 2,4,8,16
    python experiments/bench_learned.py --ks 8 --parts                # where the time of one step goes
    python experiments/bench_learned.py --model vit-s/16 --image_size 32 --ks 2,8 --heldout 64 --batch 32

The first command is the default (the study's ViT of configs/fashion_mnist_vit.py on 28x28x1 images,
K = 2, 4, 8, 16, both ways of keeping the ingredients, global mixing weights, 2 epochs over 512
held-out images at batch 64; about 2.5 minutes on this project's 2 busy cores; ``--learned_mode
global,layer`` adds per-layer weights). The third shows where memory matters: ViT-S/16 has 21.7 M
parameters (86 MB), and at 32 px its forward pass is cheap, so the ingredients dominate the process.
The output of the commands is experiments/results/bench_learned.log.

K synthetic ingredients (the model's init plus a per-ingredient random perturbation) are written once as
real soupjax ingredients (soupjax.io.checkpoints.save_ingredient) into a reusable directory (``--dir``).
Then, for each K and each way of keeping them, soupjax.arithmetic.learned.learned runs in a fresh process (so that
its peak resident memory, ru_maxrss, is its own) over a fixed synthetic held-out set, as
soupjax.cooking calls it (ingredient_loader per ingredient, apply_for_eval of the model):

  host   memory_budget_bytes=None: the K ingredients are loaded once and kept as numpy in host memory;
         every pass copies them to the device one at a time.
  disk   memory_budget_bytes = one ingredient, smaller than K of them: every pass re-reads each
         ingredient through its loader (an orbax restore).

The runs are interleaved over K and mode (a shared machine has slow spells); ``--repeats N`` runs each
N times and reports the median. The table gives, per run: the seconds of the last epoch (by default the
2nd, so the compiles of the 1st are excluded; wall, and CPU of all the process's threads, steadier on
a busy machine), split into its training steps and the held-out
evaluation that learned() records after each epoch; the first epoch (with compiles) and the time
before it (loading, and the initial evaluation); loader calls per epoch (measured); peak RSS, and peak
RSS minus the RSS of the same process just before learned() is called (jax imported, model built,
held-out set made), in MB and in models.

Per epoch of S = ceil(heldout / batch) Adam steps, learned.py's design does (see its docstring):
S forward+backward passes at the mixed model, S forward passes for the epoch's held-out evaluation,
and 2K ingredient passes per step (mix, then inner products) plus K for the evaluation's mix:
2KS + K ingredient reads (disk) or host-to-device copies (host). Before the first epoch: K loads
(host) or 1 (disk, for the layout), K reads and S forward passes for epoch 0's evaluation; after the
last, K reads for the returned soup.

Measured (experiments/results/bench_learned.log, 2 busy CPU cores): with the ingredients on the host an
epoch costs the same whatever K (about 2.3 CPU-seconds at S = 8), 85-95% of a step being the one
value_and_grad, the two streaming passes 8-12% at K = 8; from disk every read is a whole orbax restore
(55-75 ms for the study's 1.8 MB ViT, ~0.35 s for ViT-S), so an epoch grows linearly in K (18 s at
K = 16) and reads are nearly all of it. Host memory grows by about one model per ingredient; from disk
it should stay flat, and did not: each load re-read the checkpoint's metadata, which leaks Python memory
in TensorStore (~0.4 MB per load of the study's ViT). The loaders now read it once (soupjax.io.checkpoints
.ingredient_loader); the figures after that fix are in docs/benchmarks.md.

``--parts`` times the pieces of one step instead, for each K and mode: reading the K ingredients
(``Ingredients.leaves``), copying them to the device, the mixing pass, the value_and_grad, the
inner-product pass, the chain rule and Adam, and one forward pass of the evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "fashion_mnist_vit"  # configs/fashion_mnist_vit.py: ViT width 96, depth 4, 4 heads, 4x4 patches
NUM_CLASSES = 5


def build_model(name: str):
    from soupjax import models
    if name == DEFAULT_MODEL:
        return models.get_model("vit", NUM_CLASSES, hidden_size=96, num_layers=4, num_heads=4, mlp_dim=384,
                                patch_size=4)
    return models.get_model(name, NUM_CLASSES)


def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------
# Ingredients, written once.


def make_ingredients(root: Path, model_name: str, image_size: int, channels: int, k: int, scale: float) -> list[Path]:
    """K ingredients under ``root`` (reused when they already exist for the same model and scale)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax.io import checkpoints
    tag = {"bench": "bench_learned", "model": model_name, "image_size": image_size, "channels": channels,
           "scale": scale}
    paths = [root / f"ing{i:02d}" for i in range(k)]
    todo = [i for i, p in enumerate(paths)
            if not (checkpoints.is_ingredient(p) and {**checkpoints.load_meta(p), "index": 0} == {**tag, "index": 0})]
    if todo:
        model = build_model(model_name)
        variables = jax.device_get(jax.jit(lambda r: model.init(
            r, jnp.zeros((1, image_size, image_size, channels))))(jax.random.PRNGKey(0)))
        for i in todo:
            rng = np.random.default_rng(1000 + i)
            noisy = jax.tree_util.tree_map(
                lambda x: (x + scale * rng.standard_normal(x.shape)).astype(x.dtype), variables)
            checkpoints.save_ingredient(paths[i], noisy, {**tag, "index": i})
        print(f"wrote {len(todo)} ingredients under {root}", flush=True)
    return paths


# ---------------------------------------------------------------------------------------------------
# The child: one learned soup (or one --parts timing) in a fresh process.


def _heldout(spec: dict):
    import numpy as np
    rng = np.random.default_rng(0)
    n, s, c = spec["heldout"], spec["image_size"], spec["channels"]
    images = rng.standard_normal((n, s, s, c), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    b = spec["batch"]
    batches = []
    for i in range(0, n, b):
        img, lab = images[i:i + b], labels[i:i + b]
        mask = np.ones(b, np.float32)
        if len(lab) < b:  # pad the last batch, as the soupjax pipelines do: one batch shape, one compile
            mask[len(lab):] = 0
            img = np.concatenate([img, np.zeros((b - len(lab), *img.shape[1:]), img.dtype)])
            lab = np.concatenate([lab, np.zeros(b - len(lab), lab.dtype)])
        batches.append({"image": img, "label": lab, "mask": mask})
    return batches


def child_learned(spec: dict) -> dict:
    import jax
    from soupjax.io import checkpoints
    from soupjax.arithmetic import learned
    from soupjax.evaluation.evaluate import apply_for_eval
    model = build_model(spec["model"])
    apply_fn = apply_for_eval(model)
    batches = _heldout(spec)
    calls = {"n": 0}

    def counting(loader):
        def load():
            calls["n"] += 1
            return loader()
        return load

    loaders = [counting(checkpoints.ingredient_loader(p)) for p in spec["paths"]]
    budget = None if spec["where"] == "host" else spec["size_bytes"]  # disk: room for one, not K
    events = []  # (what, time, loader calls so far)
    cpu = {}

    def heldout_batches():
        events.append(("batches_start", time.perf_counter(), calls["n"]))
        yield from batches
        events.append(("batches_end", time.perf_counter(), calls["n"]))

    def on_epoch(entry):
        events.append((f"epoch{entry['epoch']}", time.perf_counter(), calls["n"]))
        cpu[entry["epoch"]] = time.process_time()  # all threads of this process

    base_mb = _rss_mb()
    t0 = time.perf_counter()
    res = learned.learned(loaders, apply_fn, heldout_batches, mode=spec["mode"], epochs=spec["epochs"],
                          memory_budget_bytes=budget, on_epoch=on_epoch)
    jax.block_until_ready(res.variables)
    t_end = time.perf_counter()
    peak_mb = _rss_mb()
    # Event order: eval0 (start, end), epoch0; then per epoch: train (start, end), eval (start, end), epochE.
    ep = {name: (t, n) for name, t, n in events if name.startswith("epoch")}
    ends = [(t, n) for name, t, n in events if name == "batches_end"]
    epochs = []
    for e in range(1, spec["epochs"] + 1):
        (t_prev, n_prev), (t_e, n_e) = ep[f"epoch{e - 1}"], ep[f"epoch{e}"]
        train_end = ends[2 * e - 1][0]
        epochs.append({"seconds": t_e - t_prev, "train": train_end - t_prev, "eval": t_e - train_end,
                       "cpu": cpu[e] - cpu[e - 1], "loader_calls": n_e - n_prev})
    compiled = {name: getattr(learned, name)._cache_size() for name in
                ("_grad_step", "_inner", "_mix_first", "_mix_add_donated", "_logit_grad", "_batch_loss_jit")
                if hasattr(getattr(learned, name, None), "_cache_size")}
    return {"base_mb": base_mb, "peak_mb": peak_mb, "before_epoch1": ep["epoch0"][0] - t0,
            "loads_before_epoch1": ep["epoch0"][1], "after_last": t_end - ep[f"epoch{spec['epochs']}"][0],
            "total": t_end - t0, "epochs": epochs, "compiled": compiled, "loader_calls": calls["n"],
            "heldout_accuracy": res.heldout, "n_batches": len(batches)}


def child_parts(spec: dict) -> dict:
    """Times the pieces of one learned-soup step (as MixingProblem.loss_and_grad runs them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax.io import checkpoints
    from soupjax.arithmetic import learned
    from soupjax.evaluation.evaluate import apply_for_eval
    model = build_model(spec["model"])
    apply_fn = apply_for_eval(model)
    batches = _heldout(spec)
    loaders = [checkpoints.ingredient_loader(p) for p in spec["paths"]]
    budget = None if spec["where"] == "host" else spec["size_bytes"]
    ing = learned.Ingredients(loaders, budget)
    problem = learned.MixingProblem(ing, apply_fn, spec["mode"])
    k, sp = problem.k, problem.spec
    tx, adam_step = learned._adam(0.05)
    params = {"logits": problem.init_logits("uniform"), "temperature": jnp.float32(1.0)}
    opt_state = tx.init(params)
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def read_all():
        return [ing.leaves(i) for i in range(k)]

    def put_all(host):
        return [jax.device_put(leaves) for leaves in host]

    n_steps = spec["parts_steps"]
    for step in range(n_steps + 1):  # step 0 compiles; it is dropped below
        batch = learned._batch_arrays(batches[step % len(batches)])
        logits, temperature = params["logits"], params["temperature"]
        # The pieces of loss_and_grad, in its order.
        mixed = timed("mix pass", lambda: problem.mix_leaves(logits))
        diff, other = problem._split(mixed)
        loss, aux, g_diff, g_t = timed("value_and_grad", lambda: learned._grad_step(
            problem._apply_fn, sp, diff, other, jnp.float32(temperature), batch))

        def inner_pass():
            out = []
            for i in range(k):
                out.append(learned._inner(sp.diff_idx, g_diff, diff, ing.leaves(i)))
                jax.block_until_ready(out[-1])
            return out

        g_alpha = timed("inner pass", inner_pass)
        g_logits = timed("chain rule", lambda: learned._logit_grad(sp, problem.mode, problem._owner, logits, g_alpha))
        grads = {"logits": g_logits, "temperature": g_t}
        params, opt_state = timed("adam", lambda: adam_step(params, opt_state, grads))
        # What a pass is made of: reading (disk: orbax restores), host-to-device copies, the kernels alone.
        host = timed("  read K ingredients", read_all)
        on_device = timed("  copy K to device", lambda: put_all(host))
        a = np.asarray(problem.alphas(logits))

        def mix_on_device():
            acc = None
            for i in range(k):
                acc = (learned._mix_first(on_device[i], a[:, i]) if acc is None
                       else learned._mix_add_donated(acc, on_device[i], a[:, i]))
                jax.block_until_ready(acc)
            return acc

        timed("  mix kernels, on device", mix_on_device)
        timed("  inner kernels, on device",
              lambda: [jax.block_until_ready(learned._inner(sp.diff_idx, g_diff, diff, on_device[i])) for i in range(k)])
        del host, on_device
        timed("whole loss_and_grad", lambda: problem.loss_and_grad(logits, temperature, batch))
        timed("eval forward (1 batch)", lambda: learned._batch_loss_jit(
            problem._apply_fn, sp, diff, other, jnp.float32(temperature), batch))
    return {"parts": {name: statistics.median(v[1:]) for name, v in times.items()}}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise SystemExit(f"child failed ({spec['where']}, K={len(spec['paths'])}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


_BASELINE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp
import bench_learned as b
spec = json.loads(sys.argv[1])
model = b.build_model(spec["model"])
batches = b._heldout(spec)
print(json.dumps({"base_mb": b._rss_mb()}))
"""


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (the study's ViT, 28x28x1) or a soupjax.models name, e.g. vit-s/16")
    parser.add_argument("--image_size", type=int, default=None, help="default: 28 for the study's ViT, else 224")
    parser.add_argument("--channels", type=int, default=None, help="default: 1 for the study's ViT, else 3")
    parser.add_argument("--ks", default="2,4,8,16")
    parser.add_argument("--where", default="host,disk", help="host, disk or both (comma-separated)")
    parser.add_argument("--learned_mode", default="global", help="global, layer, or global,layer")
    parser.add_argument("--heldout", type=int, default=512, help="synthetic held-out images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is the steady-state epoch")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scale", type=float, default=0.01, help="std of each ingredient's perturbation")
    parser.add_argument("--dir", default=None, help="where the ingredients are kept between runs "
                        "(default: /tmp/soupjax_bench_learned/MODEL-SIZE)")
    parser.add_argument("--parts", action="store_true", help="time the pieces of one step instead")
    parser.add_argument("--parts_steps", type=int, default=4)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_parts(spec) if spec["parts"] else child_learned(spec)))
        return

    default = args.model == DEFAULT_MODEL
    image_size = args.image_size or (28 if default else 224)
    channels = args.channels or (1 if default else 3)
    ks = [int(x) for x in args.ks.split(",")]
    wheres = args.where.split(",")
    modes = args.learned_mode.split(",")
    root = Path(args.dir or f"/tmp/soupjax_bench_learned/{args.model.replace('/', '_')}-{image_size}x{channels}")
    t_start = time.perf_counter()
    paths = make_ingredients(root, args.model, image_size, channels, max(ks), args.scale)
    from soupjax.io import checkpoints
    import numpy as np
    structure = checkpoints.variables_structure(paths[0])
    import jax
    size_bytes = int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree_util.tree_leaves(structure)))
    size_mb = size_bytes / 1e6
    steps = -(-args.heldout // args.batch)
    print(f"model {args.model} at {image_size}x{image_size}x{channels}: one ingredient is {size_mb:.2f} MB "
          f"(float32); held-out {args.heldout} images at batch {args.batch} = S = {steps} steps per epoch; "
          f"{args.epochs} epochs; jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores",
          flush=True)
    print(f"load average at start (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
          flush=True)
    common = {"model": args.model, "image_size": image_size, "channels": channels, "heldout": args.heldout,
              "batch": args.batch, "epochs": args.epochs, "size_bytes": size_bytes, "parts": args.parts,
              "parts_steps": args.parts_steps}

    # Interleaved: every repeat goes over K, and the two ways alternate which runs first.
    plan = []
    for rep in range(args.repeats):
        for j, k in enumerate(ks):
            order = wheres if (j + rep) % 2 == 0 else wheres[::-1]
            for where in order:
                for mode in modes:
                    plan.append((k, where, mode))
    results: dict[tuple, list[dict]] = {}
    if not args.parts:
        base = json.loads(subprocess.run([sys.executable, "-c", _BASELINE, json.dumps(common),
                                          str(Path(__file__).parent)], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1])
        print(f"a process that imported jax and soupjax, built the model and made the held-out set: "
              f"{base['base_mb']:.0f} MB peak RSS", flush=True)
    for k, where, mode in plan:
        r = run_child({**common, "paths": [str(p) for p in paths[:k]], "where": where, "mode": mode})
        results.setdefault((k, where, mode), []).append(r)
        if args.parts:
            parts = ", ".join(f"{n.strip()} {v * 1e3:.1f} ms" for n, v in r["parts"].items())
            print(f"K={k:>2} {where:>4} {mode}: {parts}", flush=True)
        else:
            last = r["epochs"][-1]
            print(f"K={k:>2} {where:>4} {mode}: last epoch {last['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB, "
                  f"total {r['total']:.1f} s, compiled {r['compiled']}", flush=True)

    if args.parts:
        print_parts(results, ks, wheres, modes)
    else:
        print_table(results, ks, wheres, modes, size_mb, steps, args)
    print(f"wall time of the benchmark: {time.perf_counter() - t_start:.0f} s; load average at the end: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _med(rs, fn):
    return statistics.median(fn(r) for r in rs)


def print_table(results, ks, wheres, modes, size_mb, steps, args) -> None:
    e = args.epochs
    print()
    print(f"Expected per epoch (learned.py's design, S = {steps}): {steps} forward+backward passes, {steps} forward "
          f"passes (the epoch's held-out evaluation), 2KS + K ingredient passes = reads from disk (disk) or "
          f"host-to-device copies (host).")
    print(f"Seconds: epoch {e} (the last; medians of {args.repeats}), its training steps and its evaluation; "
          f"epoch 1 includes the compiles; 'before' = loading and epoch 0's evaluation. "
          f"RSS growth = peak minus the same process just before learned(); one model = {size_mb:.2f} MB.")
    print()
    header = ("| K | kept | mode | s/epoch | CPU s/epoch | train s | eval s | ms/step | epoch 1 s | before s "
              "| reads/epoch (expected) | peak RSS MB | growth MB | growth / model |")
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for mode in modes:
        for where in wheres:
            for k in ks:
                rs = results.get((k, where, mode))
                if not rs:
                    continue
                expected = 2 * k * steps + k
                measured = _med(rs, lambda r: r["epochs"][-1]["loader_calls"])
                growth = _med(rs, lambda r: r["peak_mb"] - r["base_mb"])
                print(f"| {k} | {where} | {mode} | {_med(rs, lambda r: r['epochs'][-1]['seconds']):.2f} "
                      f"| {_med(rs, lambda r: r['epochs'][-1]['cpu']):.2f} "
                      f"| {_med(rs, lambda r: r['epochs'][-1]['train']):.2f} "
                      f"| {_med(rs, lambda r: r['epochs'][-1]['eval']):.2f} "
                      f"| {1e3 * _med(rs, lambda r: r['epochs'][-1]['train']) / steps:.0f} "
                      f"| {_med(rs, lambda r: r['epochs'][0]['seconds']):.2f} "
                      f"| {_med(rs, lambda r: r['before_epoch1']):.2f} "
                      f"| {measured:.0f} ({expected}{' copies' if where == 'host' else ''}) "
                      f"| {_med(rs, lambda r: r['peak_mb']):.0f} | {growth:.0f} | {growth / size_mb:.1f} |")
    compiled = {str(key): rs[0]["compiled"] for key, rs in results.items()}
    print()
    print("compilations per jitted kernel of learned.py after each run (1 each = no recompiles):",
          json.dumps(sorted(set(json.dumps(c, sort_keys=True) for c in compiled.values()))))


def print_parts(results, ks, wheres, modes) -> None:
    names = list(next(iter(results.values()))[0]["parts"])
    print()
    cols = [(k, w, m) for m in modes for w in wheres for k in ks if (k, w, m) in results]
    print("| ms per step (median) | " + " | ".join(f"K={k} {w} {m}" for k, w, m in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in names:
        cells = [f"{1e3 * _med(results[c], lambda r: r['parts'][name]):.1f}" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
