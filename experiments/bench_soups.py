"""Memory and time of a uniform soup: soupjax's streamed running sum against loading all K models.

    JAX_PLATFORMS=cpu python experiments/bench_soups.py [--model vit-s/16] [--ks 4,8,16]

Writes K synthetic ingredients (the model's init plus noise) as orbax checkpoints, then, each in a fresh
process so peak memory is its own, cooks the uniform soup two ways:
  streamed   soupjax.recipes.uniform over lazy loaders (one running float32 sum + one ingredient);
  load-all   what one writes without soupjax: load every ingredient, then tree_map a mean over them.
Prints seconds and peak resident memory (ru_maxrss) for each K; the soups are checked to be equal.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import jax, numpy as np
from soupjax import checkpoints, recipes
method, root = sys.argv[1], Path(sys.argv[2])
paths = checkpoints.list_ingredients(root)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if method == "streamed":
    soup = recipes.uniform([checkpoints.ingredient_loader(p) for p in paths])
else:
    trees = [checkpoints.load_variables(p) for p in paths]
    soup = jax.tree_util.tree_map(lambda *xs: np.mean(np.stack(xs), axis=0), *trees)
soup = jax.device_get(soup)
seconds = time.perf_counter() - t
checksum = float(sum(np.asarray(x, np.float64).sum() for x in jax.tree_util.tree_leaves(soup)))
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "start_mb": base / 1024, "checksum": checksum}))
"""


def make_ingredients(root: Path, model_name: str, k: int, image_size: int) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax import checkpoints, models
    model = models.get_model(model_name, 10)
    variables = jax.device_get(jax.jit(lambda r: model.init(r, jnp.zeros((1, image_size, image_size, 3))))(
        jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    for i in range(k):
        noisy = jax.tree_util.tree_map(lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype), variables)
        checkpoints.save_ingredient(root / f"ing{i:02d}", noisy, {"init_fingerprint": "bench"})
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-s/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--ks", default="4,8,16")
    args = parser.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "all"
        size = make_ingredients(root, args.model, max(ks), args.image_size)
        print(f"model {args.model}: one ingredient is {size / 2**20:.0f} MiB of float32", flush=True)
        for k in ks:
            sub = Path(tmp) / f"k{k}"
            sub.mkdir()
            for i in range(k):
                (sub / f"ing{i:02d}").symlink_to(root / f"ing{i:02d}")
            results = {}
            for method in ("streamed", "load-all"):
                out = subprocess.run([sys.executable, "-c", _CHILD, method, str(sub)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            assert abs(results["streamed"]["checksum"] - results["load-all"]["checksum"]) <= 1e-3 * max(
                1.0, abs(results["load-all"]["checksum"])), results
            for method, r in results.items():
                rows.append((k, method, r["seconds"], r["peak_mb"], r["peak_mb"] - r["start_mb"]))
    print(f"{'K':>3} {'method':>9} {'seconds':>8} {'peak RSS MiB':>13} {'growth MiB':>11}")
    for k, method, seconds, peak, growth in rows:
        print(f"{k:>3} {method:>9} {seconds:>8.2f} {peak:>13.0f} {growth:>11.0f}")


if __name__ == "__main__":
    main()
