"""Fine-tune ingredients from the command line.

    python -m soupjax.finetune --config configs/fashion_mnist_vit.py [--workdir DIR]
    python -m soupjax.finetune --config configs/fashion_mnist_vit.py:sweep=8 --config.batch_size=64
    python -m soupjax.finetune --config configs/fashion_mnist_vit.py:sweep=8 --only 2,3   # a share of it

In a sweep, the hyperparameters it draws (config.sweep.space) replace the same fields given on the
command line.

Each ingredient lands in ``WORKDIR/ingredients/NAME/`` (training state in ``WORKDIR/train/NAME/``).
Rerunning the same command resumes the unfinished ingredient and skips finished ones; a changed config
over finished work is refused with the differing fields named, unless ``--overwrite`` is given (each
such ingredient is fine-tuned again aside and swapped in once complete). Bad input (a config file,
option or field, data that is not there offline, a directory that cannot be written) ends in one line,
``soupjax.finetune: error: ...``, exit status 2, before anything is written. Without
``--workdir`` the default below is used, the same one ``python -m soupjax.soup`` looks in.

SIGTERM (a preempted VM, Slurm, ``docker stop``) or Ctrl-C stops training after the current step with a
checkpoint of that step (every process at the same step), one line ``soupjax.finetune: preempted by
SIGTERM at step N ...; rerun the same command to resume`` and exit status 143 (SIGTERM) or 130 (Ctrl-C):
the rerun resumes from step N (``soupjax.cli.preemption``).
"""
from __future__ import annotations

import os

from absl import app, flags

from soupjax.cli import flags as command_line
from soupjax.cli import preemption
from soupjax.cli.errors import exit_on_input_error
from soupjax.cli.startup import compilation_cache_in, prepare_process
from soupjax.io.workdirs import default_workdir

PROGRAM = "soupjax.finetune"
FLAGS = flags.FLAGS
command_line.define_config_file("config", "Training config file, e.g. configs/fashion_mnist_vit.py[:options].")
flags.DEFINE_string("workdir", None, "Work directory (default: $SOUPJAX_WORKDIR or ./runs/soupjax).")
flags.DEFINE_bool("overwrite", False, "Replace finished ingredients (and training state) made with another "
                  "config: each is fine-tuned again aside and swapped in only once complete. Without it, "
                  "such work is refused.")
flags.DEFINE_list("only", None, "Fine-tune only these ingredients of the sweep, by index (e.g. 0,3): one "
                  "machine's share when a sweep is split over several (docs/multihost.md).")


def main(argv) -> int:
    del argv  # the flags parser refused positional arguments
    # JAX and TensorFlow are imported only now: a bad flag or config was refused in the first second.
    from soupjax.devices import sharding
    from soupjax.training import planning, sweep
    sharding.initialize_multihost()

    from soupjax.io import files
    workdir = os.fspath(files.absolute(FLAGS.workdir or default_workdir()))  # gs://... stays a URL
    print(f"{PROGRAM}: work directory {workdir}", flush=True)
    runs = sweep.ingredient_configs(FLAGS.config)
    if FLAGS.only:
        runs = sweep.select(runs, FLAGS.only)
    # Every check that needs no training (conflicting finished work, a directory that cannot be
    # written, data not available offline, an empty held-out split) comes before anything is written.
    plan = planning.plan_runs(runs, os.path.join(workdir, "ingredients"), os.path.join(workdir, "train"),
                           overwrite=FLAGS.overwrite)
    if any(run.meta is None for run in plan):
        compilation_cache_in(workdir)
    planning.run_plan(plan)
    return 0


def run() -> None:
    prepare_process()
    # SIGTERM or Ctrl-C: stop at the next step boundary with the work saved, one line, exit 143 or 130.
    main_ = preemption.exit_on_preemption(PROGRAM, exit_on_input_error(PROGRAM, main))
    app.run(main_, flags_parser=command_line.flags_parser(PROGRAM, "config"))


if __name__ == "__main__":
    run()
