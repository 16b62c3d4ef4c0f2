"""The whole model-soups study in one resumable command, on the embedded default data.

    python -m soupjax.experiment                          # Fashion-MNIST; README.md gives its time
    python -m soupjax.experiment --quick                  # a smoke test of the whole job, under 3 minutes
    python -m soupjax.experiment --seed 1 --workdir runs/study-seed1

1. Upstream: there are no downloadable weights here, so the shared pretrained init is made by training
   the ViT on Fashion-MNIST classes 0-4 (``stage=upstream``) until its held-out accuracy levels off
   (``lr_schedule='plateau'``; the ingredients too, up to a cap: configs/fashion_mnist_vit.py). Fine-tuning then moves it to a *new task*,
   classes 5-9, which is what fine-tuning a pretrained model is; pretraining on all classes would
   leave nothing to fine-tune.
2. A sweep of ingredients fine-tuned from that init on classes 5-9, each with random hyperparameters,
   every one starting from a linear-probe head (LP-FT), as the paper's runs do.
3. Every recipe (uniform, greedy, pruned, learned global and per layer) and the logit ensemble.
4. The report: the table is printed at the end, with a paired McNemar test of each soup against the
   best ingredient (chosen on held-out data) on the test images and on the shifted test images.

Rerunning the command skips every finished step.

The reference-scale studies (CIFAR-10 ViT-Ti/16 and resnet50d, ImageNet ViT-B/32) are a sweep and
every recipe, nothing more; ``--sweep_config`` runs that for any config (see experiments/):

    python -m soupjax.experiment --sweep_config configs/cifar10_vit_ti16.py:init=/path/Ti_16.npz
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from absl import app, flags

from soupjax.workdirs import enable_compilation_cache, quiet_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/fashion_mnist_vit.py", "Config file with stage=upstream/downstream options.")
flags.DEFINE_string("workdir", None, "Work directory (default: $SOUPJAX_WORKDIR/study or ./runs/soupjax/study).")
flags.DEFINE_bool("quick", False, "A shrunk study (under 3 minutes on 2 cores): smaller model, short caps, no run reaches the plateau.")
flags.DEFINE_integer("seed", 0, "Sweep seed: hyperparameter draws and data orders of the ingredients.")
flags.DEFINE_integer("ingredients", None, "Number of ingredients in the sweep (default 8; 6 with --quick).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).")
flags.DEFINE_bool("ingredients_only", False, "Stop after the ingredients, cooking nothing: the pilot sweep whose "
                  "learning curves fix the regime is looked at before any soup exists (experiments/RESULTS.md).")
flags.DEFINE_string("sweep_config", None, "Instead of the default study: fine-tune the sweep of this config "
                    "(FILE[:options]) and cook every recipe from it.")
flags.DEFINE_integer("recalibrate_bn", 0, "With --sweep_config: also cook every soup with BatchNorm statistics "
                     "recomputed on this many training batches (into soups-recalibrated/).")


def load_config_module(path: str):
    """Import a config file by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"soupjax_config_{Path(path).stem}", path)
    if spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """``FILE[:options]`` -> the ConfigDict its ``get_config(options)`` returns."""
    path, _, arg = spec.partition(":")
    return load_config_module(path).get_config(arg or None)


def run_sweep_study(config, workdir: Path, *, recipe: str = "all", recalibrate_bn: int = 0,
                    learned_epochs: int = 5) -> dict:
    """A reference-scale study: the config's sweep, then ``recipe`` (and, for BatchNorm models, the
    same again with recalibrated statistics, so the two can be compared)."""
    from soupjax import kitchen, sweep
    ingredients_dir = workdir / "ingredients"
    sweep.finetune_all(sweep.ingredient_configs(config), workdir, ingredients_dir)
    results = {"plain": kitchen.cook(recipe, ingredients_dir, workdir / "soups", learned_epochs=learned_epochs,
                                     command=" ".join(sys.argv))}
    if recalibrate_bn:
        results["recalibrated"] = kitchen.cook(recipe, ingredients_dir, workdir / "soups-recalibrated",
                                               recalibrate_bn=recalibrate_bn, learned_epochs=learned_epochs,
                                               command=" ".join(sys.argv))
    return results


def run_study(config_path: str, workdir: Path, *, quick: bool, seed: int, count: int,
              data_dir: str | None = None, ingredients_only: bool = False) -> dict:
    """Upstream run, sweep, every recipe; returns the soup results (also written as a report), or
    ``{}`` with ``ingredients_only``."""
    from soupjax import checkpoints, kitchen, sweep, train

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
    ingredients_dir = workdir / f"ingredients-seed{seed}"
    sweep.finetune_all(sweep.ingredient_configs(downstream), workdir, ingredients_dir, label="2/3 ingredient")
    if downstream.eval_every_steps > 0:
        from soupjax import learning_curves
        out = workdir / f"learning-curves-seed{seed}"
        print(learning_curves.write(workdir, [seed], out), flush=True)
        print(f"learning curves: {out}.png", flush=True)
    if ingredients_only:
        print(f"ingredients finished in {time.time() - start:.0f}s: {ingredients_dir}", flush=True)
        return {}

    print(f"[3/3] cooking every recipe ({time.time() - start:.0f}s so far)", flush=True)
    results = kitchen.cook("all", ingredients_dir, workdir / f"soups-seed{seed}",
                           learned_epochs=2 if quick else 3, command=" ".join(sys.argv))
    print(f"study finished in {time.time() - start:.0f}s; report in {workdir / f'soups-seed{seed}'}", flush=True)
    return results


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from soupjax.workdirs import default_workdir
    workdir = Path(FLAGS.workdir or os.path.join(default_workdir(), "study")).absolute()
    print(f"soupjax.experiment: work directory {workdir}", flush=True)
    enable_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(workdir / ".jax_cache"))
    if FLAGS.sweep_config:
        ignored = [f"--{name}" for name in ("quick", "seed", "ingredients", "config") if FLAGS[name].present]
        if ignored:
            raise app.UsageError(f"{', '.join(ignored)} belong to the default study, not to --sweep_config "
                                 "(set them in the config's options instead)")
        config = load_config(FLAGS.sweep_config)
        if FLAGS.data_dir:
            config.data.data_dir = FLAGS.data_dir
        run_sweep_study(config, workdir, recalibrate_bn=FLAGS.recalibrate_bn)
    else:
        count = FLAGS.ingredients or (6 if FLAGS.quick else 8)
        run_study(FLAGS.config, workdir, quick=FLAGS.quick, seed=FLAGS.seed, count=count,
                  data_dir=FLAGS.data_dir, ingredients_only=FLAGS.ingredients_only)
    return 0


def run() -> None:
    quiet_logs()
    app.run(main)


if __name__ == "__main__":
    run()
