"""Parameter trees by name: the one way soupjax names a parameter (``params/Transformer/encoder_norm/scale``),
and the flat ``{'a/b/c': leaf}`` form that importers, preflight checks and error messages use.

Every message about a parameter names it the way ``path_str`` does, so a user can grep for it in any
checkpoint soupjax wrote or read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import jax

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
