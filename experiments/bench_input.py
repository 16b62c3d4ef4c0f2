"""Input-pipeline throughput on the default data config (Fashion-MNIST, 32x32x3, pad-crop + flip).

  JAX_PLATFORMS=cpu python experiments/bench_input.py [--data_dir DIR] [--batch 256] [--steps 200]

Prints images/s of train_batches (after the first batch, which includes decoding the split into memory)
and of eval_batches over 'test', for the in-memory reader (cache=True, the default) and the streaming one
(cache=False, what ImageNet-sized data sets use).
"""
import argparse
import time

from soupjax import data


def bench(cfg, batch: int, steps: int) -> dict:
    t = time.perf_counter()
    it = data.train_batches(cfg, batch, seed=0)
    next(it)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    train = steps * batch / (time.perf_counter() - t)
    evals = []
    for _ in range(2):
        t = time.perf_counter()
        n = sum(float(b["mask"].sum()) for b in data.eval_batches(cfg, "test", 1000))
        evals.append(n / (time.perf_counter() - t))
    return {"first_batch_s": round(first, 2), "train_img_s": round(train), "eval_img_s": [round(e) for e in evals]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    for cache in (True, False):
        cfg = data.default_data_config()
        cfg.data_dir, cfg.cache = args.data_dir, cache
        print(f"cache={cache}:", bench(cfg, args.batch, args.steps), flush=True)


if __name__ == "__main__":
    main()
