"""The whole model-soups study in one resumable command, on the embedded default data.

    python -m soupjax.experiment                          # Fashion-MNIST, about 20 minutes on 2 CPU cores
    python -m soupjax.experiment --quick                  # the same story in about 3 minutes
    python -m soupjax.experiment --seed 1 --workdir runs/study-seed1

1. Upstream: there are no downloadable weights here, so the shared pretrained init is made by training
   the ViT on Fashion-MNIST classes 0-4 (``stage=upstream``). Fine-tuning then moves it to a *new task*,
   classes 5-9, which is what fine-tuning a pretrained model is; pretraining on all classes would
   leave nothing to fine-tune.
2. A sweep of ingredients fine-tuned from that init on classes 5-9, each with random hyperparameters,
   every one starting from a linear-probe head (LP-FT), as the paper's runs do.
3. Every recipe (uniform, greedy, pruned, learned global and per layer) and the logit ensemble.
4. The report: the table is printed at the end, with a paired McNemar test of each soup against the
   best ingredient (chosen on held-out data) on the test images and on the shifted test images.

Rerunning the command skips every finished step.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from absl import app, flags

from soupjax.workdirs import quiet_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/fashion_mnist_vit.py", "Config file with stage=upstream/downstream options.")
flags.DEFINE_string("workdir", None, "Work directory (default: $SOUPJAX_WORKDIR/study or ./runs/soupjax/study).")
flags.DEFINE_bool("quick", False, "A shrunk study (about 3 minutes on 2 cores) that tells the same story less surely.")
flags.DEFINE_integer("seed", 0, "Sweep seed: hyperparameter draws and data orders of the ingredients.")
flags.DEFINE_integer("ingredients", 8, "Number of ingredients in the sweep.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).")


def load_config_module(path: str):
    """Import a config file by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"soupjax_config_{Path(path).stem}", path)
    if spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_study(config_path: str, workdir: Path, *, quick: bool, seed: int, count: int,
              data_dir: str | None = None) -> dict:
    """Upstream run, sweep, every recipe; returns the soup results (also written as a report)."""
    from soupjax import checkpoints, soup, sweep, train

    module = load_config_module(config_path)
    extra = ",quick" if quick else ""
    start = time.time()

    upstream_dir = workdir / "upstream" / "ingredient"
    upstream = module.get_config(f"stage=upstream{extra}")
    if data_dir:
        upstream.data.data_dir = data_dir
    if checkpoints.is_ingredient(upstream_dir):
        print(f"[1/3] upstream: finished earlier ({upstream_dir})", flush=True)
    else:
        print(f"[1/3] upstream: training the shared init on classes {list(upstream.data.classes)}", flush=True)
        meta = train.train_and_evaluate(upstream, workdir / "upstream" / "train", upstream_dir)
        print(f"[1/3] upstream: test accuracy {meta['metrics']['test']['accuracy']:.4f} "
              f"({meta['train_seconds']:.0f}s)", flush=True)

    downstream = module.get_config(f"stage=downstream,sweep={count},seed={seed},init={upstream_dir}{extra}")
    if data_dir:
        downstream.data.data_dir = data_dir
    runs = sweep.ingredient_configs(downstream)
    ingredients_dir = workdir / f"ingredients-seed{seed}"
    for i, (name, config, hparams) in enumerate(runs, 1):
        target = ingredients_dir / name
        if checkpoints.is_ingredient(target):
            continue
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items())
        print(f"[2/3] ingredient {i}/{len(runs)} {name}: {shown}", flush=True)
        meta = train.train_and_evaluate(config, workdir / "train" / name, target, extra_meta={"hparams": hparams})
        print(f"[2/3] ingredient {i}/{len(runs)} {name}: held-out {meta['metrics']['heldout']['accuracy']:.4f} "
              f"({meta['train_seconds']:.0f}s)", flush=True)

    print(f"[3/3] cooking every recipe ({time.time() - start:.0f}s so far)", flush=True)
    results = soup.cook("all", ingredients_dir, workdir / f"soups-seed{seed}", config=None,
                        learned_epochs=downstream.get("soup_learned_epochs", 5),
                        command=" ".join(sys.argv))
    print(f"study finished in {time.time() - start:.0f}s; report in {workdir / f'soups-seed{seed}'}", flush=True)
    return results


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from soupjax.workdirs import default_workdir
    workdir = Path(FLAGS.workdir or os.path.join(default_workdir(), "study")).absolute()
    print(f"soupjax.experiment: work directory {workdir}", flush=True)
    run_study(FLAGS.config, workdir, quick=FLAGS.quick, seed=FLAGS.seed, count=FLAGS.ingredients,
              data_dir=FLAGS.data_dir)
    return 0


def run() -> None:
    quiet_logs()
    app.run(main)


if __name__ == "__main__":
    run()
