"""The state dict inside a PyTorch checkpoint as torch.load-based readers find it: a training
checkpoint's ``state_dict_ema`` / ``state_dict`` / ``model`` entry, else the file's root mapping. One
home for both readers (timm's through torch.load, CLIP's through the archive's own unpickler)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from soupjax.cli.errors import InputError

# Tried in this order, as timm's load_checkpoint does: an EMA copy is what a training run recommends.
WRAPPERS = ("state_dict_ema", "state_dict", "model")


def unwrap(obj: Any, path: str | os.PathLike) -> Mapping:
    """The mapping of parameter names to tensors in ``obj`` (what a checkpoint file at ``path`` held);
    ``InputError`` naming the file when it holds something else."""
    for wrapper in WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of "
                         "parameter names to tensors)")
    return obj
