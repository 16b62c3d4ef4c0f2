"""Decoded splits kept on disk beside a data set's TFRecords.

Every command that reads a small data set (Fashion-MNIST, CIFAR) decodes whole splits into memory
(``pipeline._arrays``); without this file each start would parse and decode them again: about 5 s of
the 15 s a 2-step fine-tuning command takes on Fashion-MNIST (experiments/bench_decoded_cache.py), paid
again by every ingredient of a sweep started separately, every resumed run and every cook.

A file is named by what it holds (data set, split, class filter, first index, image shape), by this
file's ``FORMAT`` and TFDS's version, and by the name, size and modification time of every file in the
data set's directory: a data set prepared again is decoded again. Files are written under a temporary
name and renamed (in a bucket, uploaded whole), so a reader never sees half of one; one that cannot be
written (a read-only data directory, a nearly full disk) or read back (damaged) is skipped and the split
decoded as before.
``SOUPJAX_DECODED_CACHE=0`` turns it off.

The labels of a whole split are kept the same way (``load_labels``): counting the examples of a
class-filtered split reads every record's label, about 4 s per process for the study's three splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from soupjax.io import files

SUBDIRECTORY = "soupjax-decoded"
# Set to 0 to neither read nor write decoded copies (every process decodes, as before this file).
ENABLE_VARIABLE = "SOUPJAX_DECODED_CACHE"
# Part of every file name: raise it when what a decoded split holds changes (the decoding, the filter).
FORMAT = 1
_NAMES = ("images", "labels", "index")
LABELS_PREFIX = "labels-"
_DTYPES = (np.uint8, np.int32, np.int64)
# A write killed half-way leaves its temporary file; the next write removes those older than this.
_STALE_SECONDS = 3600


def enabled() -> bool:
    """False when ``SOUPJAX_DECODED_CACHE=0``."""
    return os.environ.get(ENABLE_VARIABLE, "1") != "0"


def path_for(data_dir: str | os.PathLike, what: Sequence[Any], *, prefix: str = "") -> files.AnyPath | None:
    """The cache file of ``what`` for the data set in ``data_dir`` (None: switched off, or the directory
    cannot be listed); ``prefix`` starts its name (``LABELS_PREFIX`` for a split's labels)."""
    if not enabled():
        return None
    directory = files.as_path(data_dir)
    try:
        listing = _listing(directory)
    except OSError:
        return None
    import tensorflow_datasets as tfds  # its version decides how splits like train[:n] are read
    key = [FORMAT, tfds.__version__, list(what), listing]
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:24]
    return directory / SUBDIRECTORY / f"{prefix}{digest}.npz"


def _listing(directory: files.AnyPath) -> list[tuple[str, int, Any]]:
    """(name, size, modification time) of every file in ``directory`` (a local path or a bucket URL)."""
    if not files.is_url(directory):
        return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(directory) if e.is_file())
    fs, key = files.object_store(directory)
    fs.invalidate_cache(key)  # gcsfs keeps listings: a data set prepared again since must be seen
    return sorted((info["name"].rsplit("/", 1)[-1], int(info.get("size") or 0), str(info.get("updated") or ""))
                  for info in fs.ls(key, detail=True) if info.get("type") == "file")


def load(path: files.AnyPath | None, n: int, shape: Sequence[int]) -> tuple[np.ndarray, ...] | None:
    """(images [n, *shape], labels, index) from ``path`` (``path_for``'s), or None when it is no usable file."""
    arrays = _read(path, _NAMES)
    if arrays is None:
        return None  # unreadable or damaged: decoded again, and the file replaced if it can be
    if (any(a.ndim < 1 or len(a) != n or a.dtype != d for a, d in zip(arrays, _DTYPES))
            or arrays[0].shape[1:] != tuple(shape)):
        return None
    return arrays


def load_labels(path: files.AnyPath | None) -> np.ndarray | None:
    """The labels of a whole split saved by ``save_labels`` at ``path`` (None: none usable)."""
    read = _read(path, ("labels",))
    return read[0] if read is not None and read[0].ndim == 1 and read[0].dtype == np.int32 else None


def _read(path: files.AnyPath | None, names: Sequence[str]) -> tuple[np.ndarray, ...] | None:
    """The arrays ``names`` of the .npz at ``path`` (a local path or a bucket URL); None when there is
    no such file or it cannot be read whole."""
    try:
        if path is None or not path.is_file():
            return None
        with path.open("rb") as file, np.load(file, allow_pickle=False) as saved:
            return tuple(saved[name] for name in names)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def save_labels(path: files.AnyPath | None, labels: np.ndarray) -> None:
    """Keeps a split's labels (int32) at ``path``: counting a class-filtered split otherwise reads every
    record of it again in each process (Fashion-MNIST's training split here: about 3 s through TFDS's
    reader, a fraction of a second where ``records`` reads its file)."""
    _save(path, {"labels": labels})


def save(path: files.AnyPath | None, arrays: Sequence[np.ndarray]) -> None:
    """Keeps ``arrays`` (images, labels, index) at ``path`` (``path_for``'s) for the next process; nothing
    when it cannot (None, a read-only directory, or less free space than twice their size: checkpoints
    may share that disk)."""
    _save(path, dict(zip(_NAMES, arrays)))


def _save(path: files.AnyPath | None, arrays: dict[str, np.ndarray]) -> None:
    if path is None:
        return
    try:
        if not files.is_url(path):  # a bucket has no temporaries left in it nor a free space to keep
            path.parent.mkdir(exist_ok=True)
            _remove_stale_temporaries(path.parent)
            if shutil.disk_usage(path.parent).free < 2 * sum(a.nbytes for a in arrays.values()):
                return
        files.write_atomic(path, lambda tmp: np.savez(tmp, **arrays))
    except OSError:
        pass  # the next process decodes the split itself


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of writes killed half-way (``files.write_atomic`` names them '.NAME.*.tmp.npz')."""
    now = time.time()
    for tmp in directory.glob(".*.tmp.npz"):
        try:
            if now - tmp.stat().st_mtime > _STALE_SECONDS:
                tmp.unlink()
        except OSError:
            pass  # renamed or removed by its writer meanwhile
