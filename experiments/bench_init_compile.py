"""How long a ResNet's init takes to compile: Flax's He-normal conv initialiser against soupjax's
flat-drawn one (soupjax/models/initializers.py), which gives the same values.

Each measurement is a fresh process (JAX keeps compiled programs in memory, and no persistent cache is
on), the two ways interleaved in rounds; it prints CPU seconds of ``jit(model.init).lower().compile()``
and checks that both ways give the same values.

    python experiments/bench_init_compile.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (config, model override)
MODELS = {
    "resnet-testing (28 px)": ("configs/fashion_mnist_vit.py:testing", "resnet-testing"),
    "resnet50d (CIFAR-10 at 224 px)": ("configs/cifar10_resnet50d.py", None),
    "resnet50 (ImageNet, 224 px)": ("configs/imagenet_vit_b32.py", "resnet50"),
}


def _flax_initializer() -> None:
    """Puts Flax's initialiser back where soupjax's ResNets use the flat-drawn one."""
    import flax.linen as nn
    from soupjax.models import resnet
    resnet._conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _one(name: str, way: str) -> None:
    """In a fresh process: compile the init of ``name`` the ``way`` ('flax' or 'soupjax'), print JSON."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax.config.base import load_config
    from soupjax.importers.activation import resolve_activation
    from soupjax.models.from_config import build_model_from_run_config
    from soupjax.training import shared_init
    if way == "flax":
        _flax_initializer()
    config_name, model_name = MODELS[name]
    config = load_config(config_name)
    if model_name:
        config.model = {"name": model_name}
    model = build_model_from_run_config(config, resolve_activation(config))
    x = jnp.zeros(shared_init.input_shape(config), jnp.float32)
    init = jax.jit(lambda r: model.init(r, x, train=False))
    key = jax.random.PRNGKey(config.init_seed)
    lowered = init.lower(key)
    start = time.process_time()
    compiled = lowered.compile()
    seconds = time.process_time() - start
    leaves = jax.tree_util.tree_leaves(jax.device_get(compiled(key)))
    digest = hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in leaves)).hexdigest()
    print(json.dumps({"seconds": seconds, "digest": digest, "leaves": len(leaves)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(*args.one)
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    names = list(MODELS)
    times: dict[tuple[str, str], list[float]] = {}
    digests: dict[tuple[str, str], set] = {}
    for r in range(args.rounds):
        for name in names:
            for way in (("flax", "soupjax") if r % 2 == 0 else ("soupjax", "flax")):  # interleaved
                out = subprocess.run([sys.executable, __file__, "--one", name, way], env=env, cwd=ROOT,
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                times.setdefault((name, way), []).append(result["seconds"])
                digests.setdefault((name, way), set()).add((result["digest"], result["leaves"]))
                print(f"round {r + 1}/{args.rounds} {name:28s} {way:8s} {result['seconds']:6.2f} s", flush=True)
    print(f"\n| model | Flax's initialiser, s | soupjax's, s | ratio | same values |\n|---|---:|---:|---:|:---:|")
    for name in names:
        flax_s, ours_s = (statistics.median(times[(name, w)]) for w in ("flax", "soupjax"))
        same = digests[(name, "flax")] == digests[(name, "soupjax")]
        print(f"| {name} | {flax_s:.2f} | {ours_s:.2f} | {flax_s / ours_s:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
