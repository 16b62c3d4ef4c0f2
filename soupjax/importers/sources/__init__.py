"""Sources of pretrained weights: one module per codebase whose files soupjax reads.

Each module of this package defines ``SOURCE``, a `Source`: which files it claims, how it reads one
into soupjax's variables for a given model, and what its own loader does that soupjax must do too
(the position-embedding resampling, the GELU of its ViTs). ``soupjax.importers.dispatch`` finds them
here by themselves, so a new source is one module in this folder and its test.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from soupjax.io.trees import Tree

# (path, init_variables, model_kind or None) -> (the model family read: 'vit' | 'resnet' | 'clip', variables
# tree with the checkpoint's collections, e.g. {'params': ..., 'batch_stats': ...}).
Reader = Callable[[Path, Mapping[str, Any], 'str | None'], tuple[str, Tree]]


@dataclasses.dataclass(frozen=True)
class Source:
    """One kind of pretrained checkpoint file and how soupjax reads it."""

    name: str  # what the file is, for messages: 'a timm state dict'
    suffixes: tuple[str, ...]  # the file names it claims, by suffix
    read: Reader
    # How its own loader resamples a position embedding to another grid (a key of posemb.POSEMB_METHODS).
    posemb_method: str
    # The GELU its ViTs were trained with, as meta.json names it ('gelu_tanh' | 'gelu_exact'); None: unknown
    # or told by each file.
    activation: str | None = None
    # For sources that share suffixes with another (CLIP's .pt and .safetensors are timm's too): whether a
    # path is this source's, by a cheap look at it (a header, the tensor names, a directory's config), in
    # place of the suffix test. Sources are asked in module-name order, so such a source must come first.
    accepts: Callable[[Path], bool] | None = None

    def claims(self, path: Path) -> bool:
        """Whether ``path`` is a file of this source: by its name, or for a source with `accepts`, by it."""
        if self.accepts is not None:
            return self.accepts(path)
        return path.suffix in self.suffixes


@functools.cache
def all_sources() -> tuple[Source, ...]:
    """The ``SOURCE`` of every module of this package, in module-name order."""
    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        source = getattr(importlib.import_module(f'{__name__}.{module}'), 'SOURCE', None)
        if isinstance(source, Source):
            found.append(source)
    return tuple(found)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's weights_only refusal runs to a dozen lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
