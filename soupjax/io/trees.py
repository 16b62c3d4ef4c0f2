"""Parameter trees by name: the one module for how soupjax names, lays out, checks and casts a tree.

* ``path_str``: the one way soupjax names a parameter (``params/Transformer/encoder_norm/scale``); every
  message about a parameter names it so, and a user can grep for it in any checkpoint soupjax wrote.
* ``flatten`` / ``unflatten``: the flat ``{'a/b/c': leaf}`` form that importers and error messages use.
* ``Layout``: what K ingredients must share to be averaged (treedef, paths, shapes, stored dtypes),
  and ``Layout.check`` / ``Layout.leaves``, the structure check that names the first differing
  parameter and both shapes.
* ``cast_to_stored`` (numpy) and ``cast_leaves`` (jitted): float32 results back to the dtype each leaf
  was stored in, integers rounded rather than truncated.
* ``TensorSource`` (a protocol): a model readable one tensor at a time; ``TreeSource`` is one in memory
  (``checkpoints.IngredientTensors`` the one on disk).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Tree",
    "path_str",
    "flatten",
    "unflatten",
    "dtype_of",
    "Layout",
    "cast_to_stored",
    "cast_traced",
    "cast_leaves",
    "TensorSource",
    "TreeSource",
    "source_layout",
]

Tree = dict[str, Any]


def path_str(path: Sequence[Any]) -> str:
    """Returns a jax key path as a '/'-joined name, e.g. ``params/Dense_0/kernel``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # an unknown key type: its own string form is still informative.
            parts.append(str(key))
    return "/".join(parts)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested mapping -> {'a/b/c': leaf}. Works for dicts and Flax FrozenDicts."""
    flat = {}
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + '/'))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """{'a/b/c': leaf} -> nested dicts (the inverse of `flatten`)."""
    tree: Tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split('/')
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# --------------------------------------------------------------------------------------------------
# Layouts: the structure K ingredients must share.


def dtype_of(x: Any) -> np.dtype:
    """The dtype of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar, as a numpy dtype."""
    dtype = getattr(x, "dtype", None)
    # Not `dtype or ...`: a plain np.dtype has len() 0 and so is falsy.
    return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def _listed(paths: Sequence[str]) -> str:
    return f"{list(paths[:10])}{' ...' if len(paths) > 10 else ''}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A tree's structure: treedef, leaf paths (``path_str``), shapes and stored dtypes, in leaf order."""

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, tree: Any) -> tuple["Layout", list[Any]]:
        """The layout of ``tree`` and its leaves (arrays, or anything with ``shape`` and ``dtype``)."""
        with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = [leaf for _, leaf in with_path]
        layout = cls(
            treedef=treedef,
            paths=tuple(path_str(p) for p, _ in with_path),
            shapes=tuple(tuple(np.shape(x)) for x in leaves),
            dtypes=tuple(dtype_of(x) for x in leaves),
        )
        return layout, leaves

    def check(self, other: "Layout", what: str, ref: str = "the soup") -> None:
        """Raises a ValueError unless ``other`` has this layout's paths and shapes.

        The message names ``what`` (the other tree), the missing and extra parameters (up to ten each)
        or the first parameter whose shape differs, with both shapes, and ``ref`` (this tree). Stored
        dtypes may differ: every leaf is averaged in float32 and cast back to ``ref``'s dtype.
        """
        if other.paths != self.paths:
            mine, theirs = set(self.paths), set(other.paths)
            missing = [p for p in self.paths if p not in theirs]
            extra = [p for p in other.paths if p not in mine]
            raise ValueError(f"{what} does not have {ref}'s tree structure: missing {_listed(missing)}, "
                             f"extra {_listed(extra)}")
        for path, want, got in zip(self.paths, self.shapes, other.shapes):
            if want != got:
                raise ValueError(f"{what}: parameter {path!r} has shape {got}, but {ref} has shape {want}")

    def leaves(self, tree: Any, what: str = "tree", ref: str = "the soup") -> list[Any]:
        """``tree``'s leaves, after ``check`` of its layout against this one."""
        other, leaves = Layout.of(tree)
        self.check(other, what, ref)
        return leaves

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """The tree of this layout with ``leaves``."""
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def structure(self) -> Any:
        """This layout as a tree of ``jax.ShapeDtypeStruct`` (a ``TensorSource``'s ``structure``)."""
        return self.unflatten([jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes)])

    @property
    def nbytes(self) -> int:
        """Bytes of one tree as stored."""
        return int(sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in zip(self.shapes, self.dtypes)))


# --------------------------------------------------------------------------------------------------
# Casts back to the stored dtype.


def cast_to_stored(x: np.ndarray, dtype: Any) -> np.ndarray:
    """A float32 or float64 numpy result back to its stored ``dtype``; integers rounded, not truncated.

    Returns ``x`` itself when it has that dtype already."""
    dtype = np.dtype(dtype)
    if dtype == x.dtype:
        return x
    if not jnp.issubdtype(dtype, jnp.inexact):
        x = np.round(x)
    return x.astype(dtype)


def cast_traced(x: jax.Array, dtype: Any) -> jax.Array:
    """``cast_to_stored`` for jax arrays (inside jitted kernels too)."""
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        x = jnp.round(x)
    return x.astype(dtype)


@functools.lru_cache(maxsize=None)
def _caster(names: tuple[str, ...]) -> Callable[[list[Any]], list[jax.Array]]:
    # One jitted cast per dtype layout, kept for the process (keyed by dtype names, which hash where
    # dtype objects may not): every soup of a sweep has the same layout, so it is traced once.
    dtypes = tuple(np.dtype(n) for n in names)
    return jax.jit(lambda leaves: [cast_traced(jnp.asarray(x), d) for x, d in zip(leaves, dtypes)])


def cast_leaves(leaves: Sequence[Any], dtypes: Sequence[Any]) -> list[jax.Array]:
    """Each leaf cast to its stored dtype (integers rounded), in one jitted call on the device."""
    return _caster(tuple(np.dtype(d).name for d in dtypes))(list(leaves))


# --------------------------------------------------------------------------------------------------
# Tensor sources: a model read one tensor at a time.


@runtime_checkable
class TensorSource(Protocol):
    """A model (an ingredient, an init), readable one tensor at a time.

    ``structure`` is its variables tree with a ``jax.ShapeDtypeStruct`` (anything with ``shape`` and
    ``dtype``) at each leaf; its leaves, named by ``path_str`` of their key paths, are the tensors
    ``read`` returns, in the stored dtype. ``name`` (optional) is used in error messages. ``read`` may
    be called from several threads at once.

    A source may also have ``read_into(path, out)``, which reads the tensor into ``out`` (a C-contiguous
    numpy array of its shape and stored dtype). The per-tensor engine then reads into a few buffers
    that it reuses, and the first ingredient straight into the soup's tensor, instead of a new array per
    read: no allocator churn, no page faults on fresh memory, no copy.
    """

    structure: Any

    def read(self, path: str) -> Any: ...


class TreeSource:
    """A variables tree in memory as a ``TensorSource`` (tests, or a soup mixed with ingredients on disk)."""

    def __init__(self, tree: Any, name: str = "tree"):
        layout, leaves = Layout.of(tree)
        self.name = name
        self._leaves = dict(zip(layout.paths, leaves))
        self.structure = layout.structure()

    def read(self, path: str) -> np.ndarray:
        if path not in self._leaves:
            raise KeyError(f"{self.name} has no parameter {path!r}")
        return np.asarray(self._leaves[path])


def source_layout(source: Any, what: str) -> Layout:
    """The layout of a ``TensorSource``'s structure; a TypeError naming ``what`` for anything else."""
    if not isinstance(source, TensorSource):
        raise TypeError(f"{what} is a {type(source).__name__}, not a TensorSource (structure and read(path))")
    return Layout.of(source.structure)[0]
