"""The strict merge: every parameter of the model taken from a checkpoint, and every missing, extra or
misshaped one named, all together, in one `PretrainedMismatchError`, so that a wrong file fails loudly
instead of fine-tuning from a half-random init.

Trees are compared by '/'-joined paths (``soupjax.io.trees.flatten``); ``dont_load`` patterns are
regexes fully matched against them, as big_vision does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from soupjax.io.trees import Tree, flatten, unflatten


class PretrainedMismatchError(ValueError):
    """A checkpoint does not fit the model; `problems` holds one line per offending parameter."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(
            f'checkpoint {source} does not match the model ({len(problems)} problems):\n  '
            + '\n  '.join(problems)
            + "\n(parameters that should keep their init value, such as a new head, go in "
              "dont_load, e.g. dont_load=('head/.*',))")


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    """Whether a '/'-joined parameter path fully matches one of the regexes ``patterns``."""
    # fullmatch, as big_vision: 'head/.*' must not catch 'pre_logits_head/...'.
    return any(re.fullmatch(p, path) for p in patterns)


def merge_collection(loaded: Mapping[str, Any], init: Mapping[str, Any], dont_load: Iterable[str],
                     label: str = '') -> tuple[dict[str, Any], list[str]]:
    """Merges one collection; returns the flat result and the problems (paths shown after ``label``).

    Every path of ``init`` is taken from ``loaded`` (cast to the init dtype) unless it matches
    ``dont_load``, which keeps the init value; a path of ``loaded`` that ``init`` lacks is a problem
    unless it matches ``dont_load``.
    """
    dont_load = tuple(dont_load)
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for path, ref in flat_init.items():
        if matches_any(path, dont_load):
            if isinstance(ref, jax.ShapeDtypeStruct):
                problems.append(f'{label}{path}: kept from init by dont_load, but the init '
                                'variables are abstract (jax.eval_shape); pass a real init')
            merged[path] = ref
        elif path not in flat_loaded:
            problems.append(f'{label}{path}: missing in checkpoint (model {tuple(ref.shape)})')
        elif tuple(np.shape(flat_loaded[path])) != tuple(ref.shape):
            problems.append(f'{label}{path}: shape mismatch: checkpoint '
                            f'{tuple(np.shape(flat_loaded[path]))} vs model {tuple(ref.shape)}')
        else:
            merged[path] = jnp.asarray(flat_loaded[path], dtype=ref.dtype)
    for path, value in flat_loaded.items():
        if path not in flat_init and not matches_any(path, dont_load):
            problems.append(f'{label}{path}: unexpected in checkpoint (checkpoint '
                            f'{tuple(np.shape(value))}, not in the model)')
    return merged, problems


def merge_params(loaded: Mapping[str, Any], init: Mapping[str, Any], *,
                 dont_load: Iterable[str] = (), source: str = '<file>') -> Tree:
    """Takes every parameter of `init` from `loaded`, strictly.

    Trees are compared by '/'-joined paths. A path that fully matches a `dont_load` regex keeps
    its init value (and may be missing from, or extra in, `loaded`). Every other missing, extra
    or misshaped parameter is reported, all together, in one PretrainedMismatchError naming
    `source`. Loaded values are cast to the init dtype. `init` may be abstract
    (jax.ShapeDtypeStruct leaves, from jax.eval_shape) unless a dont_load path keeps a leaf.
    """
    merged, problems = merge_collection(loaded, init, dont_load)
    if problems:
        raise PretrainedMismatchError(source, problems)
    return unflatten(merged)


def unfit_paths(loaded: Mapping[str, Any], init: Mapping[str, Any], dont_load: Iterable[str]) -> list[str]:
    """Exact-path regexes for the ``dont_load`` parameters that the checkpoint cannot provide: missing,
    of another shape, or extra; a head is one unit, so a bias goes with its kernel."""
    dont_load = tuple(dont_load)
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    unfit = [p for p, ref in flat_init.items() if matches_any(p, dont_load)
             and (p not in flat_loaded or tuple(np.shape(flat_loaded[p])) != tuple(ref.shape))]
    unfit += [p for p in flat_loaded if p not in flat_init and matches_any(p, dont_load)]
    # A head is one unit: if its kernel does not fit, its bias is not loaded either.
    groups = {p.rsplit('/', 1)[0] for p in unfit}
    unfit += [p for p in flat_init if p.rsplit('/', 1)[0] in groups and matches_any(p, dont_load)]
    return [re.escape(p) for p in sorted(set(unfit))]
