"""Train-step, evaluation and soup throughput of a model on synthetic data, on whatever JAX finds.

    python experiments/bench_step.py --model vit-ti/16 --image_size 224 --batch 256
    python experiments/bench_step.py --model resnet50d --image_size 224 --batch 128

Needs JAX, Flax, optax and orbax only (no TensorFlow), so it runs on an accelerator host that has no
input pipeline installed: it times the jitted, data-parallel step that soupjax.training.train runs, the
evaluator's forward pass, and a streamed uniform soup of K ingredients saved as orbax checkpoints.
Prints measured images/s and seconds; the data-input side is measured by experiments/bench_input.py.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    from soupjax import models
    from soupjax.io import checkpoints
    from soupjax.arithmetic import soups
    from soupjax.devices import sharding
    from soupjax.evaluation.evaluate import Evaluator
    from soupjax.evaluation.evaluate import apply_for_eval
    from soupjax.training.train_step import make_optimizer, make_train_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-ti/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--soup_k", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="compute dtype of the model (e.g. bfloat16)")
    args = parser.parse_args()

    mesh = sharding.data_mesh()
    kwargs = {} if args.dtype == "float32" else {"dtype": getattr(jnp, args.dtype)}
    model = models.get_model(args.model, args.num_classes, **kwargs)
    shape = (args.batch, args.image_size, args.image_size, 3)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + shape[1:]), train=False))(jax.random.PRNGKey(0))
    config = types.SimpleNamespace(warmup_steps=10, learning_rate=0.003, grad_clip_norm=1.0, optimizer="sgd",
                                   weight_decay=0.0, momentum=0.9)
    tx, hparams = make_optimizer(config, 1000)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"], "opt_state": tx.init(variables["params"])}
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    state = sharding.replicate(state, mesh)
    step = make_train_step(model, tx, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal(shape, np.float32), "label": rng.integers(0, args.num_classes, args.batch),
             "targets": np.eye(args.num_classes, dtype=np.float32)[rng.integers(0, args.num_classes, args.batch)]}
    batch = sharding.shard_batch(batch, mesh)
    t = time.perf_counter()
    state, metrics = step(state, batch, jax.random.PRNGKey(0), hparams)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, jax.random.PRNGKey(0), hparams)
    jax.block_until_ready(metrics)
    train_rate = args.steps * args.batch / (time.perf_counter() - t)

    evaluator = Evaluator(apply_for_eval(model), mesh)
    host = jax.device_get({k: v for k, v in state.items() if k in ("params", "batch_stats")})
    eval_batches = [{"image": np.asarray(rng.standard_normal(shape, np.float32)),
                     "label": rng.integers(0, args.num_classes, args.batch), "mask": np.ones(args.batch, np.float32)}
                    for _ in range(4)]
    evaluator(host, eval_batches[:1])
    t = time.perf_counter()
    for _ in range(max(1, args.steps // 4)):
        evaluator(host, eval_batches)
    eval_rate = max(1, args.steps // 4) * 4 * args.batch / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.soup_k):
            noisy = jax.tree_util.tree_map(lambda x: x + np.float32(0.001 * i), host)
            checkpoints.save_ingredient(Path(tmp) / f"ing{i:02d}", noisy, {"init_fingerprint": "bench"})
        loaders = [checkpoints.ingredient_loader(p) for p in checkpoints.list_ingredients(tmp)]
        t = time.perf_counter()
        soup = soups.uniform(loaders)
        jax.block_until_ready(soup)
        soup_s = time.perf_counter() - t
    size_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(host)) / 2**20
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}")
    print(f"model {args.model} @ {args.image_size}px, batch {args.batch}, {args.dtype}, {size_mb:.0f} MiB of variables")
    print(f"train step: {train_rate:,.0f} images/s (first step incl. compile {compile_s:.1f} s)")
    print(f"evaluation: {eval_rate:,.0f} images/s")
    print(f"uniform soup of {args.soup_k} ingredients from orbax checkpoints: {soup_s:.2f} s "
          f"({soup_s / args.soup_k:.3f} s per ingredient, load included)")


if __name__ == "__main__":
    main()
