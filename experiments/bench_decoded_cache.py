"""Start-up cost of reading Fashion-MNIST: splits decoded again by every process, against read back from
the copy `soupjax/data/decoded_cache.py` keeps beside the data set.

    python experiments/bench_decoded_cache.py --data_dir ~/tensorflow_datasets --repeats 3

Each round runs, in fresh processes and in alternating order, the same two commands a user runs most:
`finetune` of configs/fashion_mnist_vit.py:testing (a 2-step run that reads the train, held-out and test
splits) into a new work directory, once with SOUPJAX_DECODED_CACHE=0 ("decode": no copy read or
written, what every start did before) and once reading the copies back ("read back"). The persistent
XLA cache is shared and warm for both, so the difference is the data. Prints each run's wall time and the medians, and the
ratio read back / decode.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="TFDS data dir holding fashion_mnist_local")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from soupjax.data import decoded_cache
    scratch = Path(tempfile.mkdtemp(prefix="bench_decoded_"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(scratch / "xla"))

    def run(name: str) -> float:
        # "decode" with the cache switched off: what every start did before (no copies read, none written).
        switch = {decoded_cache.ENABLE_VARIABLE: "0" if name == "decode" else "1"}
        workdir = scratch / f"work-{time.monotonic_ns()}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "soupjax.finetune", "--config", "configs/fashion_mnist_vit.py:testing",
                        f"--config.data.data_dir={args.data_dir}", f"--workdir={workdir}"],
                       cwd=ROOT, env={**env, **switch}, check=True, capture_output=True)
        return time.perf_counter() - start

    try:
        run("read back")  # writes the copies if missing, warms the XLA and page caches; not counted
        times: dict[str, list[float]] = {"decode": [], "read back": []}
        for r in range(args.repeats):
            for name in (("decode", "read back") if r % 2 == 0 else ("read back", "decode")):
                times[name].append(run(name))
                print(f"round {r + 1} {name:9s} {times[name][-1]:6.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"median: decode {med['decode']:.2f} s, read back {med['read back']:.2f} s, "
              f"ratio {med['read back'] / med['decode']:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
