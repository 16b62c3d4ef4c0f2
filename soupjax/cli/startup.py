"""What every command line does before its work: quiet the libraries' logs, start TensorFlow without
Keras, and keep compiled programs.

One home for these, so ``finetune``, ``soup``, ``experiment`` and ``import_ingredients`` start the same way.
"""
from __future__ import annotations

import os

from soupjax.io import files

CACHE_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def prepare_process() -> None:
    """Before anything imports TensorFlow: quiet logs, and no Keras."""
    quiet_logs()
    without_keras()


def without_keras() -> None:
    """TensorFlow imports all of Keras when it is imported (to register its optimizers), about a second
    of every command's start-up (1.0 of 3.5 CPU-seconds for ``import tensorflow`` here); soupjax uses
    only tf.data. ``TF_USE_LEGACY_KERAS=1`` points that import at ``tf_keras``, which soupjax does not
    install, and TensorFlow skips it on the ImportError. Only command lines do this (a library user's
    process may want ``tf.keras``), and only when the variable is not set already."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def quiet_logs() -> None:
    """Keep the terminal for soupjax's own progress lines: orbax, TFDS and TF log at INFO otherwise."""
    import logging
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Keep compiled XLA programs on disk: a sweep builds the same train step for every ingredient,
    and a resumed or repeated command starts without recompiling."""
    import jax
    if not files.is_url(directory):  # JAX writes a gs:// cache through etils.epath itself
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compilation_cache_in(workdir: str | os.PathLike) -> None:
    """The command lines' cache: ``$JAX_COMPILATION_CACHE_DIR`` when set (tests share one), else
    ``WORKDIR/.jax_cache``, so that each work directory keeps what its runs compiled."""
    enable_compilation_cache(os.environ.get(CACHE_ENV_VAR) or files.as_path(workdir) / ".jax_cache")
