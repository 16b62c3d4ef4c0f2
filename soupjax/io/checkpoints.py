"""Checkpoints: ingredients (a params tree plus ``meta.json``) and resumable training state.

This is the only module that imports orbax, so that a move to its V1 API is a change to one file.

An ingredient directory looks like::

    NAME/
      meta.json        config, hyperparameters, init fingerprint, held-out/test metrics, steps, wall time
      variables/       orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}

It is written under a temporary name and renamed into place, so a crash never leaves a half-written
ingredient that a later sweep would skip as finished or a soup would cook with. On an object store
(``gs://``), which cannot rename a directory, it also holds ``COMMITTED`` (``files.MARKER``), written
last: without it the ingredient is unfinished, and ``is_ingredient``/``list_ingredients`` ignore it. ``meta.json`` carries a
``format_version``; a reader refuses a newer one than it knows (ingredients written before the field
existed are version 1). An ingredient that cannot be read (a missing or malformed meta.json, a
truncated or deleted checkpoint file) raises ``IngredientError``, an ``InputError`` that names it.

``meta.json`` and ``eval_logits.npz`` are written through ``soupjax.io.files`` (under a temporary name,
renamed into place); the variables by orbax, into the staging directory that is renamed as a whole.

An ingredient is read whole (``load_variables``, an orbax restore of the tree) or one array at a time
(``IngredientTensors``: each array is opened through orbax's own TensorStore spec and read on its own),
which is what the per-tensor soups of ``recipes`` stream from.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from soupjax.io import files
from soupjax.cli.errors import InputError
from soupjax.io.trees import path_str  # parameters are named as every soup error names them

META_FILE = "meta.json"
VARIABLES_DIR = "variables"
EVAL_FILE = "eval_logits.npz"   # held-out/test logits from training time, reused when cooking
# The layout of an ingredient (this docstring's). Raise it when a reader of the old layout would
# misread the new one; a reader refuses versions above its own rather than guess.
FORMAT_VERSION = 1
# meta.json's "kind" of the shared start training writes beside the ingredients (training.shared_init):
# ingredient-format, and never an ingredient itself. Ingredients record no kind.
START_KIND = "start"


class IngredientError(InputError):
    """An ingredient on disk that cannot be used (unreadable, incomplete or of an unknown format)."""


def _to_host(tree: Any) -> Any:
    """Numpy copies of every leaf: ingredients are stored unsharded, loadable on any topology."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def save_ingredient(directory: str | os.PathLike, variables: Mapping[str, Any], meta: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray] | None = None) -> files.AnyPath:
    """Write ``variables`` and ``meta`` as an ingredient at ``directory`` (atomically, replacing it).

    ``arrays`` (optional) are saved beside them as ``eval_logits.npz``. ``meta`` gets this layout's
    ``format_version``. On any failure (a full disk included) the staging directory is removed and an
    ingredient already at ``directory`` is left as it was; a kill while the new one is swapped in leaves
    a complete one at ``directory`` or at ``files.replaced_name(directory)``. On an object store
    (``gs://``) the ingredient is finished when its commit marker, written last, exists: a first save
    writes in place, a replacing one in a staging prefix swapped in by ``files.replace_directory``.
    The directory gets the permissions the umask gives any other (not ``mkdtemp``'s 0700).
    """
    directory = files.absolute(directory)
    url = files.is_url(directory)
    if not url:
        directory.parent.mkdir(parents=True, exist_ok=True)
    multihost = jax.process_count() > 1
    primary = jax.process_index() == 0
    if multihost:
        # Orbax saves collectively (it syncs all processes), so every process must call it with the
        # same path; only the primary process writes the metadata and renames.
        from jax.experimental import multihost_utils
        staging = directory.parent / f".{directory.name}.tmp"
        if primary:
            files.remove_tree(staging)
        multihost_utils.sync_global_devices(f"soupjax-save-start-{directory}")
    elif url:
        # No rename on an object store: a first save writes where it belongs (what is there is no finished
        # ingredient, only the leftovers of a killed save); a replacing one keeps the old until the new is whole.
        staging = (directory.parent / f".{directory.name}.tmp-{os.urandom(4).hex()}"
                   if is_ingredient(directory) else directory)
        files.remove_tree(staging)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        files.chmod_as_umask(staging)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / VARIABLES_DIR, _to_host(dict(variables)))
        checkpointer.wait_until_finished()
        if primary:
            if arrays:
                files.write_atomic(staging / EVAL_FILE, lambda tmp: np.savez(tmp, **arrays))
            files.write_json_atomic(staging / META_FILE, {**meta, "format_version": FORMAT_VERSION})
            files.commit(staging)  # last: on an object store, what makes the ingredient finished
            # The old ingredient is moved aside, not deleted, before the new one is renamed in: a kill
            # between the two renames leaves both whole (see training.planning.plan_run's recovery).
            if staging != directory:
                files.replace_directory(staging, directory)
    except BaseException:
        if primary:
            files.remove_tree(staging)
        raise
    if multihost:
        multihost_utils.sync_global_devices(f"soupjax-save-done-{directory}")
    return directory


def is_ingredient(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a finished ingredient (its metadata and its variables, and on an
    object store its commit marker: ``files.is_committed``)."""
    directory = files.as_path(directory)
    return ((directory / META_FILE).is_file() and (directory / VARIABLES_DIR).is_dir()
            and files.is_committed(directory))


def is_start(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a shared start (meta.json's ``kind`` is ``START_KIND``), not an
    ingredient. An unreadable meta.json is not a start: ``load_meta`` names its damage where it is read."""
    try:
        meta = json.loads((files.as_path(directory) / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == START_KIND


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of an ingredient; ``IngredientError`` naming the file when it is missing,
    not a JSON object, or of a newer ``format_version`` than this soupjax reads."""
    path = files.as_path(directory) / META_FILE
    if not path.is_file():
        raise IngredientError(f"{directory} is not a soupjax ingredient: {path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngredientError(f"{path} is not valid JSON ({e}): the ingredient's metadata is corrupt; "
                              "fine-tune it again or move it out of the ingredients directory") from e
    if not isinstance(meta, dict):
        raise IngredientError(f"{path} holds a JSON {type(meta).__name__}, not the object of an ingredient's metadata")
    version = meta.get("format_version", 1)  # written before the field existed: the first layout
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IngredientError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise IngredientError(f"{path} has format_version {version}, but this soupjax reads ingredients up to "
                              f"version {FORMAT_VERSION}: update soupjax to cook it")
    return meta


def _unreadable(directory: str | os.PathLike, error: Exception, action: str = "read its") -> IngredientError:
    """The error for a checkpoint orbax or TensorStore could not read (truncated, a file deleted);
    ``action`` says what failed (``"open parameter 'params/head/bias' of its"``)."""
    what = " ".join(_short(error).split())
    return IngredientError(f"ingredient {directory}: cannot {action} {VARIABLES_DIR}/ checkpoint, which is truncated "
                           f"or corrupt ({type(error).__name__}: {what[:300]}); fine-tune it again or move it "
                           "out of the ingredients directory")


# What orbax and TensorStore raise for a checkpoint with a missing, cut or garbled file: these, and
# only these, are reported as an unreadable ingredient (anything else is a bug and keeps its traceback).
# TensorStore reports every failed open or read (NOT_FOUND, DATA_LOSS, ...) as a ValueError. A TypeError
# or KeyError (a tree that does not match its metadata) is not corruption a user can fix by fine-tuning again.
_READ_ERRORS = (OSError, ValueError, EOFError)


def variables_structure(directory: str | os.PathLike) -> Any:
    """Tree of ``jax.ShapeDtypeStruct`` describing an ingredient's variables, read without loading them."""
    path = files.absolute(directory) / VARIABLES_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{directory} has no {VARIABLES_DIR}/ checkpoint")
    try:
        item = ocp.StandardCheckpointer().metadata(path).item_metadata
    except PermissionError:
        raise  # not corrupt: the command line says which file it may not read
    except _READ_ERRORS as e:
        raise _unreadable(directory, e) from e
    if item is None:  # orbax logs a warning and returns None when its _METADATA file does not parse
        raise _unreadable(directory, ValueError("orbax found no tree metadata"))
    metadata = item.tree
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), metadata,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


@functools.lru_cache(maxsize=None)
def _restorer() -> ocp.StandardCheckpointer:
    """One checkpointer for every restore (building one per load cost a few ms each, and its threads)."""
    return ocp.StandardCheckpointer()


def load_variables(directory: str | os.PathLike, structure: Any = None) -> dict[str, Any]:
    """An ingredient's variables as numpy arrays in host memory (never on the accelerator).

    ``structure`` (from ``variables_structure``) spares re-reading the checkpoint's metadata: that read
    was about half the time of loading a small ingredient, and orbax 0.12.8 / TensorStore 0.1.86 keep
    ~2.7 KB per array of each metadata call (a learned soup re-reading 8 ingredients from disk for 5
    epochs made ~3,800 loads). After the restore, the memory glibc keeps from orbax's reading threads
    is handed back: without it, reading ViT-B ingredients one after another held ~0.25 GB more per
    ingredient, up to ~2 GB.
    """
    structure = structure if structure is not None else variables_structure(directory)
    target = jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), structure)
    path = files.absolute(directory) / VARIABLES_DIR
    try:
        variables = _restorer().restore(path, target)
    except PermissionError:
        raise  # not corrupt: the command line says which file it may not read
    except _READ_ERRORS as e:
        raise _unreadable(directory, e) from e
    _release_freed_memory()
    return variables


def ingredient_loader(directory: str | os.PathLike) -> Callable[[], dict[str, Any]]:
    """A zero-argument loader, so recipes can stream ingredients instead of holding all K at once.

    The checkpoint's structure is read on the first call and remembered: greedy, pruned and learned
    soups load an ingredient many times.
    """
    directory = files.as_path(directory)
    structure: list[Any] = []

    def load() -> dict[str, Any]:
        if not structure:
            structure.append(variables_structure(directory))
        return load_variables(directory, structure[0])

    return load


# --------------------------------------------------------------------------------------------------
# One array at a time.

_TS_CONTEXT: ts.Context | None = None
_TS_CONTEXT_LOCK = threading.Lock()


# What the OCDBT driver may cache across per-array reads. Orbax's default (100 MB) suits one restore;
# over a K-ingredient soup the cache filled by ~19 MB per ViT-B ingredient read, memory that a soup
# streaming in O(one tensor) must not hold. Without it the reads were no slower (page cache warm).
_OCDBT_CACHE_BYTES = 0


def _ts_context() -> ts.Context:
    """One TensorStore context for every per-array read (orbax's, with a bounded OCDBT cache)."""
    global _TS_CONTEXT
    with _TS_CONTEXT_LOCK:
        if _TS_CONTEXT is None:
            _TS_CONTEXT = ts.Context(
                ts.Context.Spec({"cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_CACHE_BYTES}}),
                parent=ocp.type_handlers.get_ts_context(use_ocdbt=True))
        return _TS_CONTEXT


# TensorStore reads each array into buffers of its own (the file's bytes, the decoded chunk) on its own
# threads before copying it out. glibc keeps what those threads free in per-thread arenas, which over a
# per-tensor soup of ViT-B ingredients came to ~0.25 of a model of memory held and unused: every
# _TRIM_EVERY bytes read, malloc_trim hands it back (glibc only; elsewhere this does nothing).
_TRIM_EVERY = 64 << 20
_read_since_trim = 0
_TRIM_LOCK = threading.Lock()
try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (AttributeError, OSError):
    _malloc_trim = None


def _count_read(nbytes: int) -> None:
    global _read_since_trim
    with _TRIM_LOCK:
        _read_since_trim += nbytes
        due = _read_since_trim >= _TRIM_EVERY
        if due:
            _read_since_trim = 0
    if due:
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Hands the memory that glibc keeps in its arenas after a read back to the system (glibc only)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


# Orbax's PyTree metadata file (format_utils.PYTREE_METADATA_FILE, which orbax does not export): the tree
# and its arrays' names, no shapes. The ingredients of one soup share it byte for byte, so the tree is
# asked of orbax once per distinct file, not once per ingredient: orbax's metadata() reads every array's
# metadata too, and kept ~1.3 MB per call (ViT-B, orbax 0.12.8, tensorstore 0.1.86), ~40 MB over K=32.
# Should orbax rename the file, the cache is never hit and every ingredient asks orbax: slower, not wrong.
_TREE_METADATA_FILE = "_METADATA"
_TREES: dict[bytes, tuple[Any, tuple[tuple[str, str], ...], bool]] = {}
_TREES_LOCK = threading.Lock()


def _tree_of(ckpt: Path) -> tuple[Any, tuple[tuple[str, str], ...], bool]:
    """``(treedef, ((path, array name), ...), use_zarr3)`` of the orbax checkpoint at ``ckpt``."""
    file = ckpt / _TREE_METADATA_FILE
    key = file.read_bytes() if file.is_file() else None
    with _TREES_LOCK:
        if key is not None and key in _TREES:
            return _TREES[key]
    item = ocp.StandardCheckpointer().metadata(ckpt).item_metadata
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    with_path, treedef = jax.tree_util.tree_flatten_with_path(item.tree, is_leaf=is_leaf)
    entry = (treedef, tuple((path_str(keypath), m.name) for keypath, m in with_path), bool(item.use_zarr3))
    if key is not None:
        with _TREES_LOCK:
            while len(_TREES) >= 8:
                _TREES.pop(next(iter(_TREES)))
            _TREES[key] = entry
    return entry


class IngredientTensors:
    """An ingredient on disk, read one array at a time (a ``trees.TensorSource``).

    ``structure`` is the ingredient's tree of ``jax.ShapeDtypeStruct`` (from the checkpoint metadata,
    nothing loaded); ``paths``, ``shapes`` and ``dtypes`` are its leaves in tree order, each named by its
    '/'-joined path as ``trees.path_str`` names it (``params/head/kernel``). ``read(path)`` reads that
    array alone, in its stored dtype, as a numpy array in host memory, and ``read_into(path, out)`` reads
    it into a buffer of the caller's: the TensorStore spec is orbax's own
    (``type_handlers.get_json_tspec_read``), so any checkpoint orbax restores reads the same here.
    Reads may run from several threads at once.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = files.absolute(directory)
        self.name = str(self.directory)
        ckpt = self.directory / VARIABLES_DIR
        if not ckpt.is_dir():
            raise FileNotFoundError(f"{directory} has no {VARIABLES_DIR}/ checkpoint")
        treedef, names, use_zarr3 = _tree_of(ckpt)
        use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(ckpt))
        specs = [ocp.type_handlers.get_json_tspec_read(
            ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(ckpt), use_zarr3=use_zarr3,
                                        is_ocdbt_checkpoint=use_ocdbt, ts_context=_ts_context()),
            use_ocdbt=use_ocdbt) for _, name in names]
        # Shapes and dtypes from each array's own metadata, all opened at once (nothing read yet).
        opening = [ts.open(spec, context=_ts_context(), open=True, read=True) for spec in specs]
        self._specs: dict[str, str] = {}  # as JSON text: a fraction of the memory of 200 nested dicts
        self._structs: dict[str, jax.ShapeDtypeStruct] = {}
        for (path, _), spec, future in zip(names, specs, opening):
            try:
                store = future.result()
            except _READ_ERRORS as e:
                raise _unreadable(self.directory, e, f"open parameter {path!r} of its") from e
            self._structs[path] = jax.ShapeDtypeStruct(tuple(store.shape), np.dtype(store.dtype.numpy_dtype))
            self._specs[path] = json.dumps(spec)
        self.structure = jax.tree_util.tree_unflatten(treedef, list(self._structs.values()))

    def __repr__(self) -> str:
        return f"IngredientTensors({self.name!r})"

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._structs)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s.shape for s in self._structs.values())

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        return tuple(s.dtype for s in self._structs.values())

    def read(self, path: str) -> np.ndarray:
        """The array at ``path`` (e.g. ``params/head/kernel``), read without reading any other."""
        struct = self._struct(path)
        out = np.empty(struct.shape, struct.dtype)
        self.read_into(path, out)
        return out

    def read_into(self, path: str, out: np.ndarray) -> None:
        """Reads the array at ``path`` into ``out`` (C-contiguous, of its stored shape and dtype), no copy.

        What lets a per-tensor soup reuse a few buffers instead of allocating K models' worth of arrays.
        """
        struct = self._struct(path)
        if not (isinstance(out, np.ndarray) and out.shape == struct.shape and out.dtype == struct.dtype
                and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"ingredient {self.directory}: parameter {path!r} is {struct.shape} {struct.dtype}; "
                             f"cannot read it into {getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out))}")
        try:
            store = ts.open(json.loads(self._specs[path]), context=_ts_context(), open=True, read=True).result()
        except _READ_ERRORS as e:
            raise _unreadable(self.directory, e, f"open parameter {path!r} of its") from e
        stored = (tuple(store.shape), np.dtype(store.dtype.numpy_dtype))
        if stored != (struct.shape, struct.dtype):
            raise ValueError(f"ingredient {self.directory}: parameter {path!r} is stored as {stored[0]} "
                             f"{stored[1]}, but its metadata says {struct.shape} {struct.dtype}")
        try:
            # ts.array wraps ``out`` without copying it, so the stored array is written into ``out``.
            ts.array(out).write(store).result()
        except _READ_ERRORS as e:
            raise _unreadable(self.directory, e, f"read parameter {path!r} of its") from e
        _count_read(out.nbytes)

    def _struct(self, path: str) -> jax.ShapeDtypeStruct:
        struct = self._structs.get(path)
        if struct is None:
            have = list(self._structs)
            raise ValueError(f"ingredient {self.directory} has no parameter {path!r} "
                             f"(it has {len(have)}: {have[:5]}{' ...' if len(have) > 5 else ''})")
        return struct


def _short(error: Exception) -> str:
    """A TensorStore error without the JSON spec it appends (the spec is long and says nothing new)."""
    return str(error).split(" [tensorstore_spec=")[0]


def tensor_source(directory: str | os.PathLike) -> IngredientTensors:
    """The ingredient at ``directory`` as a per-tensor source for ``soups.uniform_by_tensor`` and the merges."""
    return IngredientTensors(directory)


def list_ingredients(root: str | os.PathLike) -> list[files.AnyPath]:
    """Finished ingredient directories under ``root`` (``root`` itself, or its sub-directories), sorted.
    On an object store an ingredient without its commit marker (a save still running, or killed) is
    not finished and not listed."""
    root = files.as_path(root)
    if is_ingredient(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and is_ingredient(p) and not is_start(p))


class TrainingCheckpoints:
    """Preemption-safe training state: an orbax ``CheckpointManager`` over ``directory``.

    Saves the whole train state every ``save_every`` steps (and on demand at the end); ``restore``
    returns the latest state laid out like ``abstract_state`` (shardings included), or ``None`` when
    nothing was saved yet, which is how a rerun of the same command resumes.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)), max_to_keep=max_to_keep, create=True)
        self.directory = files.absolute(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` (not forced) will write a checkpoint."""
        return self._manager.should_save(step)

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
