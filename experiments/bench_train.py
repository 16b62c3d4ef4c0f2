"""Fine-tuning throughput: soupjax's real training loop against timm/PyTorch eager, side by side.

    python experiments/bench_train.py                          # study ViT (batch 64 and 128) + ViT-Ti/16
    python experiments/bench_train.py --cases study64 --baseline_tree /tmp/old   # before/after a change

Each measurement is a fresh worker process, and the rounds interleave the contenders (soupjax, timm,
soupjax, timm, ...) so that a slow spell of a shared machine does not favour one; the medians are
printed with every round's figure. Contenders, each at the same model, batch, float32 and machine:

  soupjax        `soupjax.training.train.train`: the loop `python -m soupjax.finetune` runs, input pipeline
                 (TFDS over Debian's Fashion-MNIST, pad-crop + flip), host-to-device copies, the jitted
                 AdamW step, metrics and checkpoints included. Rate from the end of the first step on.
  timm           the same architecture in timm, `torch.optim.AdamW`, eager, fed by a `DataLoader` over
                 the same decoded images with torchvision's RandomCrop(padding) + RandomHorizontalFlip,
                 what a PyTorch user writes. Rate after two warm-up steps.
  timm_step      timm without the loader: one batch, stepped again and again (PyTorch's upper bound).
  soupjax@TREE   with --baseline_tree: the soupjax loop of another checkout (e.g. the commit before a
                 change, `git worktree add /tmp/old HEAD~1`), for before/after ratios measured together.

For soupjax the worker also prints the step's cost from XLA (`cost_analysis()` of the compiled step)
and the FLOP/s of a 2048x2048 float32 matmul measured in the same process: achieved FLOP/s of training
as a fraction of what this machine's matmul reaches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_workers import run_worker  # experiments/ is the script's directory, so on sys.path

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# name -> (model, batch, image size, channels); the study's batch sizes: 64 for its ingredients, 128 for
# the upstream run (configs/fashion_mnist_vit.py).
CASES = {
    "study64": ("study", 64, 28, 1),
    "study128": ("study", 128, 28, 1),
    "vit-ti16": ("vit-ti/16", 32, 224, 3),
}
STUDY_VIT = dict(hidden_size=96, num_layers=4, num_heads=4, mlp_dim=384, patch_size=4)


# ----------------------------------------------------------------------------------------- workers


def _soupjax_worker(case: str, steps: int, with_flops: bool) -> dict:
    import jax
    from soupjax.training import train
    from soupjax.config.base import load_config

    model_name, batch, size, channels = CASES[case]
    config = load_config(f"{REPO}/configs/fashion_mnist_vit.py:stage=downstream")
    config.total_steps = steps
    config.batch_size = batch
    config.head_init = "default"        # the linear probe runs once per sweep, not per step
    config.init_from.path = ""
    config.sweep.count = 0
    if model_name != "study":
        config.model = {"name": model_name}
        config.data.image_size, config.data.channels = size, channels
    with tempfile.TemporaryDirectory() as workdir:
        if hasattr(train, "train"):
            rate = train.train(config, workdir).images_per_second
        else:  # a checkout from before train() was split out of train_and_evaluate
            rate = train.train_and_evaluate(config, workdir)["train_images_per_second"]
    out = {"rate": rate}
    if with_flops:
        out.update(_step_flops(config), matmul_flops=_matmul_flops())
    out["device"] = f"{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} CPUs), jax {jax.__version__}"
    return out


def _step_flops(config) -> dict:
    """FLOPs of one compiled training step, from XLA's cost analysis."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax.devices import sharding
    from soupjax.models import build_model_from_run_config as build_model
    from soupjax.training.shared_init import base_init
    from soupjax.training.train_step import make_optimizer, make_train_step

    mesh = sharding.data_mesh()
    model = build_model(config)
    variables = base_init(config, model)
    tx, hparams = make_optimizer(config, 1000)
    state = sharding.replicate({"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                                "opt_state": tx.init(variables["params"])}, mesh)
    b, s, c = config.batch_size, config.data.image_size, config.data.channels
    batch = sharding.shard_batch({"image": np.zeros((b, s, s, c), np.float32), "label": np.zeros(b, np.int32),
                                  "targets": np.zeros((b, 5), np.float32)}, mesh)
    step = make_train_step(model, tx, mesh)
    cost = step.lower(state, batch, jax.random.PRNGKey(0), hparams).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops_per_step": float(cost["flops"])}


def _matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul: what XLA reaches on this machine at its best (median)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def _fashion_mnist(classes: tuple[int, ...]) -> tuple:
    """The training images of `classes` from Debian's files, uint8 [n, 28, 28], and labels 0..k-1."""
    import gzip

    import numpy as np
    images = np.frombuffer(gzip.open(FASHION_MNIST / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(FASHION_MNIST / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    images = images.reshape(-1, 28, 28)
    keep = np.isin(labels, classes)
    remap = np.full(10, -1)
    remap[list(classes)] = np.arange(len(classes))
    return images[keep], remap[labels[keep]]


def _timm_worker(case: str, steps: int, loader: bool) -> dict:
    import timm
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    model_name, batch, size, channels = CASES[case]
    torch.manual_seed(0)
    if model_name == "study":
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=28, patch_size=4, in_chans=1, num_classes=5, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0)
    else:
        model = timm.create_model(model_name.replace("vit-ti/16", "vit_tiny_patch16_224"), pretrained=False,
                                  num_classes=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    images, labels = _fashion_mnist((5, 6, 7, 8, 9))
    transform = v2.Compose([
        v2.ToImage(), v2.Resize(size) if size != 28 else v2.Identity(),
        v2.RandomCrop(size, padding=2), v2.RandomHorizontalFlip(),
        v2.Grayscale(channels) if channels == 3 else v2.Identity(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels)])

    class Images(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(images[i][:, :, None]), int(labels[i])

    def batches():
        if loader:
            while True:
                yield from DataLoader(Images(), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
        x, y = next(iter(DataLoader(Images(), batch_size=batch, shuffle=True, drop_last=True)))
        while True:
            yield x, y

    it = batches()

    def step():
        x, y = next(it)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch / (time.perf_counter() - t)
    return {"rate": rate, "device": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


# ------------------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="study64,study128,vit-ti16", help=f"of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="steps per measurement (default: per case)")
    parser.add_argument("--baseline_tree", default=None, help="another soupjax checkout to measure beside this one")
    parser.add_argument("--no_timm", action="store_true")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, case, steps, extra = args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3:]
        if kind == "soupjax":
            result = _soupjax_worker(case, steps, with_flops="flops" in extra)
        else:
            result = _timm_worker(case, steps, loader=(kind == "timm"))
        print(json.dumps(result), flush=True)
        return

    contenders = ["soupjax"] + ([] if args.no_timm else ["timm", "timm_step"])
    if args.baseline_tree:
        contenders.insert(1, "soupjax@baseline")
    for case in args.cases.split(","):
        model, batch, size, channels = CASES[case]
        steps = args.steps or (60 if model == "study" else 8)
        print(f"== {case}: {model} at {size}x{size}x{channels}, batch {batch}, float32, {steps} steps a measurement",
              flush=True)
        rates: dict[str, list[float]] = {c: [] for c in contenders}
        extra: dict = {}
        for r in range(args.rounds):
            for c in contenders:
                kind = c.split("@")[0]
                worker = [kind, case, str(steps)] + (["flops"] if c == "soupjax" and r == 0 else [])
                out = run_worker(__file__, worker, Path(args.baseline_tree) if c.endswith("@baseline") else None)
                rates[c].append(out["rate"])
                extra.setdefault(c, out)
                print(f"   round {r + 1} {c:18s} {out['rate']:8.1f} images/s", flush=True)
        med = {c: statistics.median(v) for c, v in rates.items()}
        for c in contenders:
            print(f"   {c:18s} median {med[c]:8.1f} images/s  ({', '.join(f'{x:.0f}' for x in rates[c])})"
                  f"  [{extra[c]['device']}]")
        for c in contenders[1:]:
            print(f"   soupjax / {c}: {med['soupjax'] / med[c]:.2f}x")
        s = extra["soupjax"]
        achieved = s["flops_per_step"] * med["soupjax"] / batch
        print(f"   step cost {s['flops_per_step'] / 1e9:.2f} GFLOP (XLA cost analysis); achieved "
              f"{achieved / 1e9:.1f} GFLOP/s = {achieved / s['matmul_flops']:.0%} of a 2048^3 float32 matmul "
              f"({s['matmul_flops'] / 1e9:.1f} GFLOP/s in the same process)", flush=True)


if __name__ == "__main__":
    main()
