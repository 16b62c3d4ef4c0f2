"""Where the training step's time goes on this machine: its rate, and a profile by kind of operation.

    python experiments/profile_step.py                               # study ViT, batch 64: rate + profile
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python experiments/profile_step.py --no_profile

Builds the jitted step `soupjax.training.train` runs (AdamW, the study's ViT of configs/fashion_mnist_vit.py by
default) on one synthetic batch already on the device, so that only the step is timed, and prints:
  * its rate: images/s, median of `--rounds` rounds of `--steps` steps (compilation excluded);
  * with the profile (default): a `jax.profiler` trace of 10 steps, the time of XLA's operations summed by
    kind (the fusion names without their numbers: `ynn_fusion` = matrix products through YNNPACK, loop
    fusions named after their first operations), per step and as a share of all operation time.
The profile needs XLA's per-operation trace events, so this script sets
`--xla_cpu_enable_xprof_traceme=true` itself (added to any XLA_FLAGS given); set XLA_FLAGS to compare
XLA options, each in its own process.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax import models
    from soupjax.devices import sharding
    from soupjax.training.train_step import make_optimizer, make_train_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no_profile", action="store_true")
    args = parser.parse_args()

    mesh = sharding.data_mesh()
    model = models.get_model("vit", 5, hidden_size=96, num_layers=4, num_heads=4, mlp_dim=384, patch_size=4)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 28, 28, 1)), train=False))(jax.random.PRNGKey(0))
    config = types.SimpleNamespace(optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, warmup_steps=10,
                                   grad_clip_norm=0.0, momentum=0.9)
    tx, hparams = make_optimizer(config, 1000)
    state = sharding.replicate({"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                                "opt_state": tx.init(variables["params"])}, mesh)
    step = make_train_step(model, tx, mesh)
    rng = np.random.default_rng(0)
    b = args.batch
    batch = sharding.shard_batch({"image": rng.standard_normal((b, 28, 28, 1), np.float32),
                                  "label": rng.integers(0, 5, b).astype(np.int32),
                                  "targets": np.eye(5, dtype=np.float32)[rng.integers(0, 5, b)]}, mesh)
    key = jax.random.PRNGKey(0)
    state, metrics = step(state, batch, key, hparams)
    jax.block_until_ready(metrics)

    rates = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch, key, hparams)
        jax.block_until_ready(metrics)
        rates.append(args.steps * b / (time.perf_counter() - t))
    flags = os.environ["XLA_FLAGS"].replace("--xla_cpu_enable_xprof_traceme=true", "").strip() or "(default)"
    print(f"XLA_FLAGS {flags}: study ViT, batch {b}: {statistics.median(rates):.0f} images/s "
          f"(rounds: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    if args.no_profile:
        return

    profiled = 10
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(profiled):
                state, metrics = step(state, batch, key, hparams)
            jax.block_until_ready(metrics)
        events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind: collections.Counter = collections.Counter()
    for event in events:
        name = event.get("name", "")
        # Python frames ($...) and the runtime's own spans contain the operations; count operations only.
        if event.get("ph") != "X" or name.startswith("$") or any(
                s in name for s in ("Thunk", "Pjit", "Await", "PjRt", "ParseArguments", "Handle inputs")):
            continue
        by_kind[re.sub(r"\.\d+$", "", name)] += event.get("dur", 0)
    total = sum(by_kind.values())
    print(f"profile of {profiled} steps: {total / 1e3 / profiled:.1f} ms of XLA operations per step")
    for kind, micros in by_kind.most_common(12):
        print(f"  {micros / 1e3 / profiled:7.2f} ms/step  {100 * micros / total:5.1f}%  {kind}")


if __name__ == "__main__":
    main()
