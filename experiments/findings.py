"""The paper's negative findings, reproduced at the scale of this machine (Fashion-MNIST, 2 CPU cores).

    python experiments/findings.py scratch   --seed N [--workdir runs/findings]   # (b) from-scratch soups collapse
    python experiments/findings.py batchnorm --seed N [--workdir runs/findings]   # (c) BatchNorm soups, and recalibration

scratch:   K ViTs trained from scratch on Fashion-MNIST classes 5-9 with different init seeds (so
           different inits), then every recipe with --allow-mixed-init. Reference: ResNets on CIFAR-100,
           best 65.78, uniform soup 1.08 (chance); greedy keeps one ingredient.
batchnorm: a BatchNorm ResNet-18 (ImageNet stem, width 16) pretrained on classes 0-4, K ingredients
           fine-tuned on classes 5-9 with SGD at learning rates 0.05-0.2 (the reference used 0.1), then the
           soups with the averaged BatchNorm statistics and again with statistics recomputed on 50
           training batches. Reference: resnet50d on CIFAR-10, ingredients about 91.3, greedy soup steps
           14.55, 14.07, 9.08.
Each run prints the soup table (also in WORKDIR/<finding>/seedN/soups*/report.md); rerunning resumes.
``--seed`` draws other inits (scratch) or data orders (batchnorm) for the ingredients; the BatchNorm
upstream model is shared by every seed, as the study's upstream model is. RESULTS.md reports seeds
0, 1 and 2. Both use fixed lengths (a cosine schedule), not the study's plateau rule: what they show
does not depend on convergence.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from soupjax.io import checkpoints
from soupjax import cooking
from soupjax.training import train
from soupjax.config.base import load_config
from soupjax.training.planning import finetune_all
from soupjax.cli.startup import enable_compilation_cache, quiet_logs

LEARNING_RATES = (0.1, 0.05, 0.2, 0.1)
RECALIBRATION_BATCHES = 50
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_vit.py")


def _fixed_length(c) -> None:
    c.lr_schedule, c.eval_every_steps = "cosine", 0


def scratch(workdir: Path, count: int, data_dir: str | None, seed: int = 0) -> None:
    runs = []
    for i in range(count):
        c = load_config(f"{CONFIG}:stage=downstream")
        c.data.data_dir = data_dir
        _fixed_length(c)
        c.init_from.path = ""
        c.head_init = "default"
        # A different init for every ingredient (the point of this finding), and for every seed.
        c.init_seed = 100 + 10 * seed + i
        c.seed = 10 * seed + i
        c.total_steps = 300
        c.learning_rate = 1e-3
        runs.append((f"scratch_{i:02d}", c, {"init_seed": c.init_seed}))
    run_dir = workdir / f"seed{seed}"
    finetune_all(runs, run_dir, run_dir / "ingredients", label="scratch")
    cooking.cook("all", run_dir / "ingredients", run_dir / "soups", allow_mixed_init=True, learned_epochs=3,
                 command=" ".join(sys.argv))


def batchnorm(workdir: Path, count: int, data_dir: str | None, seed: int = 0) -> None:
    # The ImageNet stem (stride 4 before the first stage): the CIFAR stem's 28x28 first stage trained at
    # about 45 images/s here, too slow for a run of at most 15 minutes.
    resnet = {"name": "resnet18", "width": 16}
    upstream_dir = workdir / "upstream" / "ingredient"
    if not checkpoints.is_ingredient(upstream_dir):
        up = load_config(f"{CONFIG}:stage=upstream")
        up.data.data_dir = data_dir
        up.model = resnet
        _fixed_length(up)
        up.num_epochs = 1.0
        up.optimizer, up.learning_rate, up.weight_decay, up.warmup_steps = "sgd", 0.1, 5e-5, 50
        train.train_and_evaluate(up, workdir / "upstream" / "train", upstream_dir)
    runs = []
    for i in range(count):
        c = load_config(f"{CONFIG}:stage=downstream,init={upstream_dir}")
        c.data.data_dir = data_dir
        c.model = resnet
        _fixed_length(c)
        # Learning rates around the reference's 0.1, so that the ingredients differ as a sweep's do.
        lr = LEARNING_RATES[i % len(LEARNING_RATES)]
        c.optimizer, c.learning_rate, c.weight_decay, c.warmup_steps = "sgd", lr, 5e-5, 20
        c.grad_clip_norm = 0.0
        c.total_steps = 150
        c.seed = 10 * seed + i
        runs.append((f"bn_{i:02d}", c, {"seed": c.seed, "learning_rate": lr}))
    run_dir = workdir / f"seed{seed}"
    finetune_all(runs, run_dir, run_dir / "ingredients", label="batchnorm")
    for name, recal in (("soups", 0), ("soups-recalibrated", RECALIBRATION_BATCHES)):
        cooking.cook("all", run_dir / "ingredients", run_dir / name, recalibrate_bn=recal, learned_epochs=3,
                     command=" ".join(sys.argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finding", choices=["scratch", "batchnorm"])
    parser.add_argument("--workdir", default="runs/findings")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--seed", type=int, default=0, help="ingredient inits (scratch) / data orders (batchnorm)")
    args = parser.parse_args()
    quiet_logs()
    workdir = Path(args.workdir).absolute() / args.finding
    enable_compilation_cache(str(workdir.parent / ".jax_cache"))
    print(f"findings {args.finding}: work directory {workdir}", flush=True)
    start = time.time()
    {"scratch": scratch, "batchnorm": batchnorm}[args.finding](workdir, args.count, args.data_dir, args.seed)
    print(f"findings {args.finding} seed {args.seed} finished in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
