"""The paper's negative findings, reproduced at the scale of this machine (Fashion-MNIST, 2 CPU cores).

    python experiments/findings.py scratch   [--workdir runs/findings]   # (b) from-scratch soups collapse
    python experiments/findings.py batchnorm [--workdir runs/findings]   # (c) BatchNorm soups, and recalibration

scratch:   K ViTs trained from scratch on Fashion-MNIST classes 5-9 with different init seeds (so
           different inits), then every recipe with --allow-mixed-init. Reference: ResNets on CIFAR-100,
           best 65.78, uniform soup 1.08 (chance); greedy keeps one ingredient.
batchnorm: a BatchNorm ResNet-18 (CIFAR stem, width 16) pretrained on classes 0-4, K ingredients
           fine-tuned on classes 5-9 with SGD at learning rates 0.05-0.2 (the reference used 0.1), then the
           soups with the averaged BatchNorm statistics and again with statistics recomputed on 50
           training batches. Reference: resnet50d on CIFAR-10, ingredients about 91.3, greedy soup steps
           14.55, 14.07, 9.08.
Each prints the soup table (also in WORKDIR/<finding>/soups*/report.md); rerunning resumes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soupjax import checkpoints, kitchen, train
from soupjax.experiment import load_config
from soupjax.sweep import finetune_all
from soupjax.workdirs import enable_compilation_cache, quiet_logs

LEARNING_RATES = (0.1, 0.05, 0.2, 0.1)
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_vit.py")


def scratch(workdir: Path, count: int, data_dir: str | None) -> None:
    runs = []
    for i in range(count):
        c = load_config(f"{CONFIG}:stage=downstream")
        c.data.data_dir = data_dir
        c.init_from.path = ""
        c.head_init = "default"
        c.init_seed = 100 + i          # a different init for every ingredient: the point of this finding
        c.seed = i
        c.total_steps = 300
        c.learning_rate = 1e-3
        runs.append((f"scratch_{i:02d}", c, {"init_seed": c.init_seed}))
    finetune_all(runs, workdir, workdir / "ingredients", label="scratch")
    kitchen.cook("all", workdir / "ingredients", workdir / "soups", allow_mixed_init=True, learned_epochs=3,
                 command=" ".join(sys.argv))


def batchnorm(workdir: Path, count: int, data_dir: str | None) -> None:
    resnet = {"name": "resnet18", "stem": "cifar", "width": 16}
    upstream_dir = workdir / "upstream" / "ingredient"
    if not checkpoints.is_ingredient(upstream_dir):
        up = load_config(f"{CONFIG}:stage=upstream")
        up.data.data_dir = data_dir
        up.model = resnet
        up.num_epochs = 1.0
        up.optimizer, up.learning_rate, up.weight_decay, up.warmup_steps = "sgd", 0.1, 5e-5, 50
        train.train_and_evaluate(up, workdir / "upstream" / "train", upstream_dir)
    runs = []
    for i in range(count):
        c = load_config(f"{CONFIG}:stage=downstream,init={upstream_dir}")
        c.data.data_dir = data_dir
        c.model = resnet
        # Learning rates around the reference's 0.1, so that the ingredients differ as a sweep's do.
        lr = LEARNING_RATES[i % len(LEARNING_RATES)]
        c.optimizer, c.learning_rate, c.weight_decay, c.warmup_steps = "sgd", lr, 5e-5, 20
        c.grad_clip_norm = 0.0
        c.total_steps = 150
        c.seed = i
        runs.append((f"bn_{i:02d}", c, {"seed": i, "learning_rate": lr}))
    finetune_all(runs, workdir, workdir / "ingredients", label="batchnorm")
    for name, recal in (("soups", 0), ("soups-recalibrated", 50)):
        kitchen.cook("all", workdir / "ingredients", workdir / name, recalibrate_bn=recal, learned_epochs=3,
                     command=" ".join(sys.argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finding", choices=["scratch", "batchnorm"])
    parser.add_argument("--workdir", default="runs/findings")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    quiet_logs()
    workdir = Path(args.workdir).absolute() / args.finding
    enable_compilation_cache(str(workdir.parent / ".jax_cache"))
    print(f"findings {args.finding}: work directory {workdir}", flush=True)
    {"scratch": scratch, "batchnorm": batchnorm}[args.finding](workdir, args.count, args.data_dir)


if __name__ == "__main__":
    main()
