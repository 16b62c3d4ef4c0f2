"""The uniform soup cooked from a Cloud Storage bucket against the same ingredients on local disk.

    JAX_PLATFORMS=cpu python experiments/bench_gcs.py --model vit-s/16 --k 4 --rounds 3

Issue 19 asks that cooking from a bucket streams tensors as it does from disk (no whole local copy of the
ingredients). This script writes K synthetic ingredients (``--model``'s init with ``--classes`` classes,
PRNGKey(0), plus 0.01 * N(0, 1) float32 noise drawn with numpy seed i + 1) twice with
``checkpoints.save_ingredient``: into a temporary local folder and into ``gs://soupjax-bench/`` on a
``gcp-storage-emulator`` started on 127.0.0.1 for the run (in memory; the same emulator, with the same
``x-goog-generation`` header added, as tests/test_gcs.py). Then, in rounds whose order alternates, each
a fresh process under ``/usr/bin/time -v``, it cooks the uniform soup of the K ingredients as the soup
command does, ``soups.uniform_by_tensor`` over ``checkpoints.tensor_source`` (one tensor of each
ingredient at a time), from the bucket and from disk; the soup's seconds inside the process, the whole
process's wall time and its peak resident memory are reported. The two soups are compared bit for bit
(a hash of every byte). Everything written (the local folder, the emulator's memory) is gone at the end.

The emulator is a single Python process on the same machine: its times say what streaming through the
JSON API costs in requests and copies, not what a real bucket's network gives.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_mergekit import machine_line, timed  # noqa: E402

BUCKET = "soupjax-bench"


def make_ingredients(roots: list[str], model_name: str, classes: int, k: int) -> int:
    """K ingredients under each of ``roots`` (the same bytes); the bytes of one model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from soupjax import models
    from soupjax.io import checkpoints
    model = models.get_model(model_name, classes)
    theta0 = jax.device_get(jax.jit(lambda r: model.init(r, jnp.zeros((1, 224, 224, 3))))(jax.random.PRNGKey(0)))
    theta0 = jax.tree_util.tree_map(np.asarray, theta0)
    for i in range(k):
        rng = np.random.default_rng(i + 1)
        variables = jax.tree_util.tree_map(
            lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32), theta0)
        for root in roots:
            checkpoints.save_ingredient(f"{root}/run{i}", variables, {"bench": "bench_gcs", "init_fingerprint": "b"})
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(theta0))


def child(root: str, k: int) -> None:
    """Cook the uniform soup of ``root/run0..k-1`` per tensor; print its seconds and the soup's hash."""
    import jax
    import numpy as np

    from soupjax.arithmetic import soups
    from soupjax.io import checkpoints
    t = time.perf_counter()
    soup = soups.uniform_by_tensor([checkpoints.tensor_source(f"{root}/run{i}") for i in range(k)])
    seconds = time.perf_counter() - t
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(soup):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    print(f"soup_seconds={seconds:.3f} sha256={digest.hexdigest()[:16]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit-s/16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: cook from this root
    args = parser.parse_args()
    if args.child:
        child(args.child, args.k)
        return
    print(machine_line(), flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import gcs_emulator  # tests/gcs_emulator.py: the emulator with Cloud Storage's download headers

    with gcs_emulator.running(BUCKET) as env:
        with tempfile.TemporaryDirectory(prefix="soupjax-bench-gcs-") as scratch:
            local, bucket = f"{scratch}/ingredients", f"gs://{BUCKET}/ingredients"
            t = time.perf_counter()
            size = make_ingredients([local, bucket], args.model, args.classes, args.k)
            print(f"{args.k} ingredients of {args.model} ({size / 2**20:.0f} MiB each, float32) written locally and "
                  f"to the emulator in {time.perf_counter() - t:.0f}s", flush=True)
            child_env = {**os.environ, **env, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                         "TF_CPP_MIN_LOG_LEVEL": "2"}
            rows, hashes = [], set()
            for r in range(args.rounds):
                order = [("local disk", local), ("bucket", bucket)]
                for where, root in (order if r % 2 == 0 else order[::-1]):
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", root, "--k", str(args.k)]
                    wall, rss, out = timed(cmd, child_env, Path(scratch))
                    fields = dict(f.split("=") for f in out.split() if "=" in f)
                    hashes.add(fields["sha256"])
                    rows.append((r + 1, where, float(fields["soup_seconds"]), wall, rss))
                    print(f"round {r + 1} {where}: soup {fields['soup_seconds']} s, process {wall:.1f} s, "
                          f"peak RSS {rss:.0f} MiB", flush=True)
            print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print("same soup from both (sha256 of every byte):", len(hashes) == 1)
            print("\n| from | soup s (each round) | process s (each round) | peak RSS MiB (each round) |")
            print("|---|---|---|---|")
            for where in ("local disk", "bucket"):
                mine = [row for row in rows if row[1] == where]
                print(f"| {where} | {' / '.join(f'{row[2]:.2f}' for row in mine)} | "
                      f"{' / '.join(f'{row[3]:.1f}' for row in mine)} | {' / '.join(f'{row[4]:.0f}' for row in mine)} |")


if __name__ == "__main__":
    main()
