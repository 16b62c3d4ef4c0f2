"""Decoded splits kept on disk beside a data set's TFRecords.

Every command that reads a small data set (Fashion-MNIST, CIFAR) decodes whole splits into memory
(``pipeline._arrays``); without this file each start would parse and decode them again: 4 s of the
14.6 s a 2-step fine-tuning command takes on Fashion-MNIST (experiments/bench_decoded_cache.py), paid
again by every ingredient of a sweep started separately, every resumed run and every cook.

A file is named by what it holds (data set, split, class filter, first index, image shape) and by the
name, size and modification time of every file in the data set's directory: a data set prepared again
is decoded again. Files are written under a temporary name and renamed, so a reader never sees half of
one; one that cannot be written (a read-only data directory) or read back (damaged) is skipped and the
split decoded as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from soupjax import files

SUBDIRECTORY = "soupjax-decoded"
_NAMES = ("images", "labels", "index")


def path_for(data_dir: str | os.PathLike, what: Sequence[Any]) -> Path | None:
    """The cache file of ``what`` for the data set in ``data_dir`` (None: the directory cannot be listed)."""
    directory = Path(data_dir)
    try:
        listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(directory)
                         if e.is_file())
    except OSError:
        return None
    digest = hashlib.sha256(json.dumps([list(what), listing], default=str).encode()).hexdigest()[:24]
    return directory / SUBDIRECTORY / f"{digest}.npz"


def load(data_dir: str | os.PathLike, what: Sequence[Any], n: int) -> tuple[np.ndarray, ...] | None:
    """(images, labels, index) of ``what`` with ``n`` examples, or None when there is no usable file."""
    path = path_for(data_dir, what)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = tuple(saved[name] for name in _NAMES)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # damaged: decoded again, and the file replaced
    if any(len(a) != n for a in arrays) or arrays[0].dtype != np.uint8:
        return None
    return arrays


def save(data_dir: str | os.PathLike, what: Sequence[Any], arrays: Sequence[np.ndarray]) -> None:
    """Keeps ``arrays`` (images, labels, index) for the next process; nothing when it cannot."""
    path = path_for(data_dir, what)
    if path is None:
        return

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add '.npz' to a temporary name
            np.savez(f, **dict(zip(_NAMES, arrays)))

    try:
        path.parent.mkdir(exist_ok=True)
        files.write_atomic(path, write)
    except OSError:
        pass  # a read-only or full data directory: the next process decodes the split itself
