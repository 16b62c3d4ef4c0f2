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
3. Every method in the recipe registry (``soupjax.methods``): the soups (uniform, greedy, pruned, learned
   global and per layer), the merges (task arithmetic, TIES, DARE, SLERP, spherical mean, model stock,
   WiSE-FT) and the logit and greedy ensembles.
4. The report: the table is printed at the end, with a paired McNemar test of each soup against the
   best ingredient (chosen on held-out data) on the test images and on the shifted test images.

Rerunning the command skips every finished step. Work made with another config (another ``--quick``,
an edited config file) is refused with the differing fields named; ``--overwrite`` makes it again
aside and swaps it in only once complete. SIGTERM (a preempted VM) or Ctrl-C stops the study after the
training step or the dish under way, saved, with one line and exit status 143 (SIGTERM) or 130
(Ctrl-C), as ``soupjax.finetune`` and ``soupjax.soup`` do; rerunning resumes from there.

The reference-scale studies (CIFAR-10 ViT-Ti/16 and resnet50d, ImageNet ViT-B/32) are a sweep and
every recipe, nothing more; ``--sweep_config`` runs that for any config (see experiments/):

    python -m soupjax.experiment --sweep_config configs/cifar10_vit_ti16.py:init=/path/Ti_16.npz
"""
from __future__ import annotations

import os

from absl import app, flags

from soupjax.cli import flags as command_line
from soupjax.cli import preemption
from soupjax.config import base as config_base
from soupjax.cli.errors import InputError, exit_on_input_error
from soupjax.cli.startup import compilation_cache_in, prepare_process
from soupjax.study import stages

PROGRAM = "soupjax.experiment"
FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/fashion_mnist_vit.py", "Config file with stage=upstream/downstream options, "
                    "and options of its own for both stages: configs/fashion_mnist_vit.py:regime=small_data.")
flags.DEFINE_string("workdir", None, "Work directory (default: $SOUPJAX_WORKDIR/study or ./runs/soupjax/study).")
flags.DEFINE_bool("quick", False, "A shrunk study (under 3 minutes on 2 cores): smaller model, short caps, no run reaches the plateau.")
flags.DEFINE_integer("seed", 0, "Sweep seed: hyperparameter draws and data orders of the ingredients.", lower_bound=0)
flags.DEFINE_integer("ingredients", None, "Number of ingredients in the sweep (default 8; 6 with --quick).",
                     lower_bound=1)
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).")
flags.DEFINE_bool("ingredients_only", False, "Stop after the ingredients, cooking nothing: the pilot sweep whose "
                  "learning curves fix the regime is looked at before any soup exists (experiments/RESULTS.md).")
flags.DEFINE_string("sweep_config", None, "Instead of the default study: fine-tune the sweep of this config "
                    "(FILE[:options]) and cook every recipe from it.")
flags.DEFINE_integer("recalibrate_bn", 0, "With --sweep_config: also cook every soup with BatchNorm statistics "
                     "recomputed on this many training batches (into soups-recalibrated/).", lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Replace work made with another config (the upstream model, ingredients, "
                  "the soups cooked from them): each is made again aside and swapped in only once complete. "
                  "Without it, such work is refused.")

def main(argv) -> int:
    del argv  # the flags parser refused positional arguments
    from soupjax.io import files
    from soupjax.io.workdirs import default_workdir
    workdir = files.absolute(FLAGS.workdir or os.path.join(default_workdir(), "study"))  # gs://... stays a URL
    if FLAGS.sweep_config:
        ignored = [f"--{name}" for name in ("quick", "seed", "ingredients", "config") if FLAGS[name].present]
        if ignored:
            raise InputError(f"{', '.join(ignored)} belong to the default study, not to --sweep_config "
                             "(set them in the config's options instead)")
        config = config_base.load_config(FLAGS.sweep_config)
        if FLAGS.data_dir:
            config.data.data_dir = FLAGS.data_dir
        study = lambda: stages.run_sweep_study(config, workdir, recalibrate_bn=FLAGS.recalibrate_bn,
                                        overwrite=FLAGS.overwrite)
    else:
        if FLAGS.recalibrate_bn:
            raise InputError("--recalibrate_bn belongs to --sweep_config; the default study's ViT has no BatchNorm")
        count = FLAGS.ingredients or (6 if FLAGS.quick else 8)
        # Loaded and checked here, before the work directory exists: bad options leave nothing behind.
        configs = stages.study_configs(FLAGS.config, workdir, quick=FLAGS.quick, seed=FLAGS.seed, count=count,
                                data_dir=FLAGS.data_dir)
        study = lambda: stages.run_study(configs, workdir, seed=FLAGS.seed, quick=FLAGS.quick,
                                  ingredients_only=FLAGS.ingredients_only, overwrite=FLAGS.overwrite)
    print(f"{PROGRAM}: work directory {workdir}", flush=True)
    fresh = not workdir.exists()
    compilation_cache_in(workdir)
    try:
        study()
    except InputError:
        # Refused before any work (the study checks everything first): a work directory this command
        # created holds only the compilation cache, and bad input must leave nothing behind.
        if fresh and workdir.is_dir() and {p.name for p in workdir.iterdir()} <= {".jax_cache"}:
            files.remove_tree(workdir)
        raise
    return 0


def run() -> None:
    prepare_process()
    # SIGTERM or Ctrl-C: stop at the next step boundary with the work saved, one line, exit 143 or 130.
    main_ = preemption.exit_on_preemption(PROGRAM, exit_on_input_error(PROGRAM, main))
    app.run(main_, flags_parser=command_line.flags_parser(PROGRAM))


if __name__ == "__main__":
    run()
