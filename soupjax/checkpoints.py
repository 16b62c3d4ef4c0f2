"""Checkpoints: ingredients (a params tree plus ``meta.json``) and resumable training state.

This is the only module that imports orbax, so that a move to its V1 API is a change to one file.

An ingredient directory looks like::

    NAME/
      meta.json        config, hyperparameters, init fingerprint, held-out/test metrics, steps, wall time
      variables/       orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}

It is written under a temporary name and renamed into place, so a crash never leaves a half-written
ingredient that a later sweep would skip as finished or a soup would cook with.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "meta.json"
VARIABLES_DIR = "variables"
EVAL_FILE = "eval_logits.npz"   # held-out/test logits from training time, reused when cooking


def _to_host(tree: Any) -> Any:
    """Numpy copies of every leaf: ingredients are stored unsharded, loadable on any topology."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; metadata is meant to be read by everyone
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_ingredient(directory: str | os.PathLike, variables: Mapping[str, Any], meta: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``variables`` and ``meta`` as an ingredient at ``directory`` (atomically, replacing it).

    ``arrays`` (optional) are saved beside them as ``eval_logits.npz``.
    """
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    multihost = jax.process_count() > 1
    primary = jax.process_index() == 0
    if multihost:
        # Orbax saves collectively (it syncs all processes), so every process must call it with the
        # same path; only the primary process writes the metadata and renames.
        from jax.experimental import multihost_utils
        staging = directory.parent / f".{directory.name}.tmp"
        if primary and staging.exists():
            shutil.rmtree(staging)
        multihost_utils.sync_global_devices(f"soupjax-save-start-{directory}")
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / VARIABLES_DIR, _to_host(dict(variables)))
        checkpointer.wait_until_finished()
        if primary:
            if arrays:
                np.savez(staging / EVAL_FILE, **arrays)
            write_json_atomic(staging / META_FILE, dict(meta))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if multihost:
        multihost_utils.sync_global_devices(f"soupjax-save-done-{directory}")
    return directory


def is_ingredient(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a finished ingredient (both its metadata and its variables)."""
    directory = Path(directory)
    return (directory / META_FILE).is_file() and (directory / VARIABLES_DIR).is_dir()


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of an ingredient, with a clear error when it is missing or unreadable."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a soupjax ingredient: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def variables_structure(directory: str | os.PathLike) -> Any:
    """Tree of ``jax.ShapeDtypeStruct`` describing an ingredient's variables, read without loading them."""
    path = Path(directory).absolute() / VARIABLES_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{directory} has no {VARIABLES_DIR}/ checkpoint")
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), metadata,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def load_variables(directory: str | os.PathLike) -> dict[str, Any]:
    """An ingredient's variables as numpy arrays in host memory (never on the accelerator)."""
    structure = variables_structure(directory)
    target = jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), structure)
    path = Path(directory).absolute() / VARIABLES_DIR
    return ocp.StandardCheckpointer().restore(path, target)


def ingredient_loader(directory: str | os.PathLike) -> Callable[[], dict[str, Any]]:
    """A zero-argument loader, so recipes can stream ingredients instead of holding all K at once."""
    directory = Path(directory)
    return lambda: load_variables(directory)


def list_ingredients(root: str | os.PathLike) -> list[Path]:
    """Finished ingredient directories under ``root`` (``root`` itself, or its sub-directories), sorted."""
    root = Path(root)
    if is_ingredient(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and is_ingredient(p))


class TrainingCheckpoints:
    """Preemption-safe training state: an orbax ``CheckpointManager`` over ``directory``.

    Saves the whole train state every ``save_every`` steps (and on demand at the end); ``restore``
    returns the latest state laid out like ``abstract_state`` (shardings included), or ``None`` when
    nothing was saved yet, which is how a rerun of the same command resumes.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)), max_to_keep=max_to_keep, create=True)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any) -> Any | None:
        step = self._manager.latest_step()
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
