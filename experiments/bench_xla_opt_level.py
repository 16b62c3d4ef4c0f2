"""What XLA's CPU optimisation level does to soupjax's programs: compile time and step time of a model's
init and train step at level 3 (XLA's default) and level 1 (the test suite's, tests/conftest.py), and
whether both give the same bits.

Each measurement is a fresh process with no persistent cache (JAX keeps compiled programs in memory),
the two levels interleaved in rounds. A process compiles ``jit(model.init)`` and soupjax's own train step
(``training.train_step``, the config's optimizer), runs the step on a fixed batch, and prints CPU seconds
of each compile, of a step (median of several), and a digest of the init and of the state after the
steps. Where the bits differ, the largest difference of a parameter after the steps between the levels,
relative to the largest parameter, says by how much.

    python experiments/bench_xla_opt_level.py [--rounds 3] [--steps 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("3", "1")
# name -> (config, model override, batch size)
MODELS = {
    "vit-testing (28 px)": ("configs/fashion_mnist_vit.py:testing", None, 16),
    "resnet-testing (28 px)": ("configs/fashion_mnist_vit.py:testing", "resnet-testing", 16),
    "resnet50d (CIFAR-10 at 224 px)": ("configs/cifar10_resnet50d.py", None, 8),
}


def _digest(tree) -> str:
    import jax
    leaves = jax.tree_util.tree_leaves(jax.device_get(tree))
    return hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in leaves)).hexdigest()[:16]


def _one(name: str, steps: int, save: str | None) -> None:
    """In a fresh process (XLA_FLAGS set by the caller): compile and run ``name``, print JSON."""
    import jax
    import jax.numpy as jnp
    from soupjax.config.base import load_config
    from soupjax.devices import sharding
    from soupjax.importers.activation import resolve_activation
    from soupjax.models.from_config import build_model
    from soupjax.training import shared_init
    from soupjax.training.train_step import make_optimizer, make_train_step

    config_name, model_name, batch_size = MODELS[name]
    config = load_config(config_name)
    if model_name:
        config.model = {"name": model_name}
    model = build_model(config.model, 10, resolve_activation(config))
    x = jnp.zeros(shared_init.input_shape(config), jnp.float32)
    key = jax.random.PRNGKey(config.init_seed)
    init = jax.jit(lambda r: model.init(r, x, train=False)).lower(key)
    start = time.process_time()
    init = init.compile()
    init_compile = time.process_time() - start
    variables = init(key)
    init_digest = _digest(variables)  # now: the train step donates the state these arrays become

    mesh = sharding.data_mesh()
    tx, hparams = make_optimizer(config, 100)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": tx.init(variables["params"])}
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    state = sharding.replicate(state, mesh)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, batch_size).astype(np.int32)
    batch = sharding.shard_batch({
        "image": rng.standard_normal((batch_size, *x.shape[1:])).astype(np.float32),
        "label": labels, "targets": np.eye(10, dtype=np.float32)[labels]}, mesh)
    step_rng = jax.random.PRNGKey(1)
    lowered = make_train_step(model, tx, mesh).lower(state, batch, step_rng, hparams)
    start = time.process_time()
    step = lowered.compile()
    step_compile = time.process_time() - start
    state, metrics = step(state, batch, step_rng, hparams)  # the first run, not timed
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.process_time()
        state, metrics = step(state, batch, step_rng, hparams)
        jax.block_until_ready(metrics)
        times.append(time.process_time() - start)
    if save:
        np.savez(save, *[np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(jax.device_get(state["params"]))])
    print(json.dumps({"init_compile": init_compile, "step_compile": step_compile,
                      "step": statistics.median(times), "init_digest": init_digest,
                      "state_digest": _digest(state)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args.one, args.steps, args.save)
        return
    saved = Path(tempfile.mkdtemp(prefix="bench_xla_opt_level_"))  # round 1's parameters, to compare
    try:
        results = _measure(args.rounds, args.steps, saved)
        _table(results, saved)
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def _saved(saved: Path, name: str, level: str) -> Path:
    return saved / f"{list(MODELS).index(name)}-{level}.npz"


def _measure(rounds: int, steps: int, saved: Path) -> dict[tuple[str, str], list[dict]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for name in MODELS:
            for level in (LEVELS if r % 2 == 0 else LEVELS[::-1]):  # interleaved
                # One compute thread, as the test suite runs (it is what the level is chosen for).
                flags = f"--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level={level}"
                save = ["--save", str(_saved(saved, name, level))] if r == 0 else []
                out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(steps), *save],
                                     env=dict(env, XLA_FLAGS=flags), cwd=ROOT, capture_output=True, text=True,
                                     check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((name, level), []).append(result)
                print(f"round {r + 1}/{rounds} {name:26s} level {level}: init compile "
                      f"{result['init_compile']:6.2f} s, step compile {result['step_compile']:6.2f} s, "
                      f"step {result['step'] * 1e3:7.1f} ms", flush=True)
    return results


def _table(results: dict[tuple[str, str], list[dict]], saved: Path) -> None:
    print("\n| model | init compile, level 3 / 1, s | train step compile, level 3 / 1, s "
          "| one step, level 3 / 1, ms | same bits | largest parameter difference |\n|---|---:|---:|---:|:---:|---:|")
    for name in MODELS:
        def median(level: str, field: str) -> float:
            return statistics.median(r[field] for r in results[(name, level)])

        digests = {level: {(r["init_digest"], r["state_digest"]) for r in results[(name, level)]} for level in LEVELS}
        same = len(digests["3"]) == 1 and digests["3"] == digests["1"]
        with np.load(_saved(saved, name, "3")) as a, np.load(_saved(saved, name, "1")) as b:
            largest = max(float(np.abs(a[k]).max()) for k in a.files)
            relative = max(float(np.abs(a[k] - b[k]).max()) for k in a.files) / largest
        print(f"| {name} | {median('3', 'init_compile'):.2f} / {median('1', 'init_compile'):.2f} "
              f"| {median('3', 'step_compile'):.2f} / {median('1', 'step_compile'):.2f} "
              f"| {median('3', 'step') * 1e3:.1f} / {median('1', 'step') * 1e3:.1f} | {'yes' if same else 'no'} "
              f"| {relative:.1e} of the largest |")


if __name__ == "__main__":
    main()
