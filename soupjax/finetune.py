"""Fine-tune ingredients from the command line.

    python -m soupjax.finetune --config configs/fashion_mnist_vit.py [--workdir DIR]
    python -m soupjax.finetune --config configs/fashion_mnist_vit.py:sweep=8 --config.batch_size=64

In a sweep, the hyperparameters it draws (config.sweep.space) replace the same fields given on the
command line.

Each ingredient lands in ``WORKDIR/ingredients/NAME/`` (training state in ``WORKDIR/train/NAME/``).
Rerunning the same command resumes the unfinished ingredient and skips finished ones. Without
``--workdir`` the default below is used, the same one ``python -m soupjax.soup`` looks in.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from soupjax import sharding, sweep
from soupjax.workdirs import default_workdir, enable_compilation_cache, quiet_logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/fashion_mnist_vit.py[:options].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (default: $SOUPJAX_WORKDIR or ./runs/soupjax).")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/fashion_mnist_vit.py")
    sharding.initialize_multihost()

    workdir = os.path.abspath(FLAGS.workdir or default_workdir())
    print(f"soupjax.finetune: work directory {workdir}", flush=True)
    enable_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, ".jax_cache"))
    sweep.finetune_all(sweep.ingredient_configs(FLAGS.config), workdir)
    return 0


def run() -> None:
    quiet_logs()
    app.run(main)


if __name__ == "__main__":
    run()
