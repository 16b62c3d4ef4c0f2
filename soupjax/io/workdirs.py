"""Where runs live when the user does not say: one default shared by ``finetune`` and ``soup``."""
from __future__ import annotations

import os

ENV_VAR = "SOUPJAX_WORKDIR"


def default_workdir() -> str:
    """``$SOUPJAX_WORKDIR`` if set, else ``./runs/soupjax`` (relative to the current directory)."""
    return os.environ.get(ENV_VAR) or os.path.join("runs", "soupjax")
