"""Where runs live when the user does not say: one default shared by ``finetune`` and ``soup``."""
from __future__ import annotations

import os

ENV_VAR = "SOUPJAX_WORKDIR"


def default_workdir() -> str:
    """``$SOUPJAX_WORKDIR`` if set, else ``./runs/soupjax`` (relative to the current directory)."""
    return os.environ.get(ENV_VAR) or os.path.join("runs", "soupjax")


def quiet_logs() -> None:
    """Keep the terminal for soupjax's own progress lines: orbax, TFDS and TF log at INFO otherwise."""
    import logging
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def enable_compilation_cache(directory: str) -> None:
    """Keep compiled XLA programs on disk: a sweep builds the same train step for every ingredient,
    and a resumed or repeated command starts without recompiling."""
    import jax
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
