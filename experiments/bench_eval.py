"""Evaluation throughput: soupjax's evaluator against timm/PyTorch eager in inference mode, side by side.

    python experiments/bench_eval.py                              # study ViT, ViT-Ti/16, ResNet-50
    python experiments/bench_eval.py --cases study --baseline_tree /tmp/old   # before/after a change

Each measurement is a fresh worker process, and the rounds interleave the contenders (a slow spell of a
shared machine must not favour one); medians are printed with every round's figure. The contenders,
at the same model, batch, float32 and machine, over the same number of images already decoded in host
memory (the model side of evaluation):

  soupjax        `soupjax.evaluation.evaluate.Evaluator`, what every recipe and the report evaluate with: batches
                 copied to the devices, the jitted forward pass, loss/accuracy/logits read back. The
                 compilation is done before timing.
  timm           the same architecture in timm, `model.eval()` under `torch.inference_mode()`.
  soupjax@TREE   with --baseline_tree: the evaluator of another checkout, for before/after ratios.

The data side (TFDS decode, resize, normalise: `soupjax.data.eval_batches` over the Fashion-MNIST test
split at the case's image size, with no model) is measured separately and printed beside them: a real
evaluation runs at the lower of the two rates when they overlap.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench_workers import run_worker  # experiments/ is the script's directory, so on sys.path

REPO = Path(__file__).resolve().parent.parent

# name -> (soupjax model, timm model, batch, image size, channels)
CASES = {
    "study": ("study", "study", 64, 28, 1),
    "vit-ti16": ("vit-ti/16", "vit_tiny_patch16_224", 64, 224, 3),
    "resnet50": ("resnet50", "resnet50", 64, 224, 3),
}
STUDY_VIT = dict(hidden_size=96, num_layers=4, num_heads=4, mlp_dim=384, patch_size=4)
NUM_CLASSES = 5


def _images(case: str, batches: int):
    import numpy as np
    _, _, batch, size, channels = CASES[case]
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, size, size, channels), np.float32) for _ in range(batches)]


def _soupjax_worker(case: str, batches: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from soupjax import models
    from soupjax.evaluation.evaluate import Evaluator
    from soupjax.evaluation.evaluate import apply_for_eval

    name, _, batch, size, channels = CASES[case]
    model = (models.get_model("vit", NUM_CLASSES, **STUDY_VIT) if name == "study"
             else models.get_model(name, NUM_CLASSES))
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, channels)), train=False))(
        jax.random.PRNGKey(0))
    variables = jax.device_get(variables)
    evaluator = Evaluator(apply_for_eval(model))
    data = [{"image": x, "label": np.zeros(batch, np.int32), "mask": np.ones(batch, np.float32)}
            for x in _images(case, batches)]
    evaluator(variables, data[:1])  # compile
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluator(variables, data)
        rates.append(batches * batch / (time.perf_counter() - t))
    return {"rate": statistics.median(rates),
            "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} CPUs), jax {jax.__version__}"}


def _timm_worker(case: str, batches: int, repeats: int) -> dict:
    import timm
    import torch

    _, timm_name, batch, size, channels = CASES[case]
    torch.manual_seed(0)
    if timm_name == "study":
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=28, patch_size=4, in_chans=1, num_classes=NUM_CLASSES, embed_dim=96, depth=4, num_heads=4,
            mlp_ratio=4.0)
    else:
        model = timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES)
    model.eval()
    data = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in _images(case, batches)]
    rates = []
    with torch.inference_mode():
        model(data[0])  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            for x in data:
                logits = model(x)
                logits.argmax(-1).numpy()  # read back, as an evaluation loop does
            rates.append(batches * batch / (time.perf_counter() - t))
    return {"rate": statistics.median(rates), "device": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


def _data_side(case: str, images: int) -> float:
    """Images/s of soupjax's evaluation input pipeline for the case's image size, with no model."""
    from soupjax import data
    from soupjax.config.base import load_config

    _, _, batch, size, channels = CASES[case]
    config = load_config(f"{REPO}/configs/fashion_mnist_vit.py:stage=downstream").data
    config.image_size, config.channels = size, channels
    for _ in data.eval_batches(config, "test", batch):  # the first pass decodes the split into memory
        break
    t, n = time.perf_counter(), 0
    for b in data.eval_batches(config, "test", batch):
        n += int(b["mask"].sum())
        if n >= images:
            break
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="study,vit-ti16,resnet50", help=f"of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline_tree", default=None, help="another soupjax checkout to measure beside this one")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, case, batches, repeats = args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3])
        if kind == "data":
            result = {"rate": _data_side(case, batches * CASES[case][2]), "device": "tf.data"}
        else:
            result = (_soupjax_worker if kind == "soupjax" else _timm_worker)(case, batches, repeats)
        print(json.dumps(result), flush=True)
        return

    contenders = ["soupjax", "timm"] + (["soupjax@baseline"] if args.baseline_tree else [])
    for case in args.cases.split(","):
        name, _, batch, size, channels = CASES[case]
        batches, repeats = (40, 3) if name == "study" else (4, 2)
        print(f"== {case}: {name} at {size}x{size}x{channels}, batch {batch}, float32, "
              f"{batches * batch} images x {repeats} passes a measurement (median pass)", flush=True)
        rates: dict[str, list[float]] = {c: [] for c in contenders}
        devices = {}
        for r in range(args.rounds):
            for c in contenders:
                out = run_worker(__file__, [c.split("@")[0], case, str(batches), str(repeats)],
                                  Path(args.baseline_tree) if c.endswith("@baseline") else None)
                rates[c].append(out["rate"])
                devices[c] = out["device"]
                print(f"   round {r + 1} {c:18s} {out['rate']:8.1f} images/s", flush=True)
        med = {c: statistics.median(v) for c, v in rates.items()}
        for c in contenders:
            print(f"   {c:18s} median {med[c]:8.1f} images/s  ({', '.join(f'{x:.0f}' for x in rates[c])})  [{devices[c]}]")
        for c in contenders[1:]:
            print(f"   soupjax / {c}: {med['soupjax'] / med[c]:.2f}x")
        data_rate = run_worker(__file__, ["data", case, str(max(batches, 40)), "1"])["rate"]
        print(f"   data side (soupjax.data.eval_batches, {size}x{size}x{channels}, no model): {data_rate:,.0f} images/s",
              flush=True)


if __name__ == "__main__":
    main()
