"""Evaluation throughput of a config's model against the evaluation batch size (random images).

    python experiments/bench_eval_batch.py [--config configs/fashion_mnist_vit.py] [--sizes 128,250,500,1000]

Prints images/s of `soupjax.evaluation.evaluate.Evaluator` (the jitted, data-parallel forward pass every recipe
uses) per batch size, so a config's `eval_batch_size` can be set to the fastest one for a machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist_vit.py")
    parser.add_argument("--sizes", default="128,250,500,1000")
    parser.add_argument("--images", type=int, default=5000, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all sizes; the median is printed")
    args = parser.parse_args()

    import jax
    from soupjax.evaluation import evaluate
    from soupjax.config.base import load_config
    from soupjax.models import build_model_from_run_config as build_model
    from soupjax.training.shared_init import base_init
    from soupjax.evaluation.evaluate import apply_for_eval

    config = load_config(args.config)
    model = build_model(config)
    variables = base_init(config, model)
    evaluator = evaluate.Evaluator(apply_for_eval(model))
    c = config.data
    rng = np.random.default_rng(0)
    print(f"{config.model.name} on {c.image_size}x{c.image_size}x{c.channels}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = {size: [{"image": rng.standard_normal((size, c.image_size, c.image_size, c.channels), np.float32),
                       "label": np.zeros(size, np.int32), "mask": np.ones(size, bool)}
                      for _ in range(max(1, args.images // size))] for size in sizes}
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for size in sizes:
        evaluator(variables, batches[size][:1])  # compile
    # Rounds interleave the sizes, so that a slow spell of a shared machine does not favour one of them.
    for _ in range(args.repeats):
        for size in sizes:
            start = time.perf_counter()
            evaluator(variables, batches[size])
            rates[size].append(len(batches[size]) * size / (time.perf_counter() - start))
    for size in sizes:
        r = rates[size]
        print(f"eval_batch_size {size:5d}: {np.median(r):7.0f} images/s (median of {len(r)}; "
              f"min {min(r):.0f}, max {max(r):.0f})")

if __name__ == "__main__":
    main()
