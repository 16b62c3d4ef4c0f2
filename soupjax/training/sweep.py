"""Random hyperparameter sweeps, as in the paper: each ingredient gets its own draw from a search space.

A draw depends only on (sweep seed, ingredient index), so adding ingredients later or rerunning an
interrupted sweep reproduces the hyperparameters of the ones already made. Where the ingredients go and
what is done with each (skip, resume, replace) is ``training.planning``'s.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections
import numpy as np

from soupjax.cli.errors import InputError


class UnknownFieldError(InputError, KeyError):
    """A sweep sets a path that is not a config field (a ``KeyError`` too, for callers that catch one)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, list]:
    """``{'data': {'mixup_alpha': spec}}`` -> ``{'data.mixup_alpha': spec}``.

    The space mirrors the config's nesting because ConfigDict keys may not contain dots.
    """
    flat: dict[str, list] = {}
    for key, value in space.items():
        if isinstance(value, Mapping) or hasattr(value, "items"):
            flat.update(flatten_space(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value)
    return flat


def draw(space: Mapping[str, Any], seed: int, index: int) -> dict[str, Any]:
    """Hyperparameters for ingredient ``index``: ``{config path: value}`` drawn from ``space``."""
    rng = np.random.default_rng([int(seed), int(index)])
    values: dict[str, Any] = {}
    space = flatten_space(space)
    for key in sorted(space):
        spec = list(space[key])
        kind = spec[0]
        if kind == "log_uniform":
            lo, hi = float(spec[1]), float(spec[2])
            values[key] = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        elif kind == "uniform":
            values[key] = float(rng.uniform(float(spec[1]), float(spec[2])))
        elif kind == "choice":
            options = list(spec[1])
            value = options[int(rng.integers(len(options)))]
            values[key] = value.item() if isinstance(value, np.generic) else value
        else:
            raise InputError(f"config.sweep.space[{key!r}]: unknown distribution {kind!r}; "
                             "use 'log_uniform', 'uniform' or 'choice'")
    return values


def apply(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with each dotted path in ``values`` set (the path must already exist)."""
    config = copy.deepcopy(config)
    for path, value in values.items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UnknownFieldError(f"config.sweep.space sets {path!r}, which is not a config field")
            node = node[part]
        if leaf not in node:
            raise UnknownFieldError(f"config.sweep.space sets {path!r}, which is not a config field")
        current = node[leaf]
        if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        node[leaf] = value
    return config


def ingredient_configs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]]:
    """``[(name, config, hparams)]``: one entry (``config.name``) without a sweep, ``count`` with one.

    Every ingredient of a sweep keeps ``init_seed`` (they must share the init to be souped) and gets
    its own data-order seed.
    """
    count = config.sweep.count
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InputError(f"config.sweep.count={count!r} must be a whole number, at least 0 "
                         "(0 fine-tunes one ingredient, without a sweep)")
    if count == 0:
        return [(config.name, config, {})]
    space = config.sweep.space.to_dict()
    runs = []
    for i in range(count):
        hparams = draw(space, config.sweep.seed, i)
        hparams.setdefault("seed", int(config.sweep.seed) * 1000 + i)
        run = apply(config, hparams)
        runs.append((f"sweep{int(config.sweep.seed)}_{i:03d}", run, hparams))
    return runs


def select(runs: list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]],
           indices: list[str]) -> list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]]:
    """The runs of a sweep at ``indices`` (strings from ``--only``): one machine's share of a sweep
    split over several. A draw depends only on (sweep seed, index), so machine A running ``--only 0,1``
    and machine B ``--only 2,3`` make exactly the ingredients one machine would make."""
    picked: list[int] = []
    for text in indices:
        try:
            index = int(text)
        except ValueError:
            raise InputError(f"--only {text!r}: not an ingredient index (0 to {len(runs) - 1})") from None
        if not 0 <= index < len(runs):
            raise InputError(f"--only {index}: the sweep has {len(runs)} ingredient(s), indices 0 to {len(runs) - 1}")
        if index not in picked:
            picked.append(index)
    return [runs[index] for index in picked]
