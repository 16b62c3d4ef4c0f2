"""Random hyperparameter sweeps, as in the paper: each ingredient gets its own draw from a search space.

A draw depends only on (sweep seed, ingredient index), so adding ingredients later or rerunning an
interrupted sweep reproduces the hyperparameters of the ones already made.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections
import numpy as np


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
            raise ValueError(f"sweep.space[{key!r}]: unknown distribution {kind!r}; "
                             "use 'log_uniform', 'uniform' or 'choice'")
    return values


def apply(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with each dotted path in ``values`` set (the path must already exist)."""
    config = copy.deepcopy(config)
    for path, value in values.items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"sweep sets {path!r}, which is not a config field")
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
    count = int(config.sweep.count)
    if count <= 0:
        return [(config.name, config, {})]
    space = config.sweep.space.to_dict()
    runs = []
    for i in range(count):
        hparams = draw(space, config.sweep.seed, i)
        hparams.setdefault("seed", int(config.sweep.seed) * 1000 + i)
        run = apply(config, hparams)
        runs.append((f"sweep{int(config.sweep.seed)}_{i:03d}", run, hparams))
    return runs


def finetune_all(runs: list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]], workdir, ingredients_dir=None,
                 label: str = "") -> list[dict[str, Any]]:
    """Fine-tune every ``(name, config, hparams)`` of ``runs`` that is not finished yet; return their metas.

    Ingredients land in ``ingredients_dir/NAME`` (default ``workdir/ingredients``), training state in
    ``workdir/train/NAME``. A finished ingredient is skipped only when it was made with the same config:
    a changed config in the same directory is refused with the differing fields named, because a
    sweep silently mixing old and new ingredients would make a soup of things nobody asked for.
    """
    import time
    from pathlib import Path

    from soupjax import checkpoints, train
    from soupjax.config_base import refuse_changed

    workdir = Path(workdir)
    ingredients_dir = Path(ingredients_dir) if ingredients_dir else workdir / "ingredients"
    prefix = f"{label} " if label else ""
    start, metas = time.time(), []
    for i, (name, config, hparams) in enumerate(runs, 1):
        tag = f"[{prefix}{i}/{len(runs)}] {name}"
        target = ingredients_dir / name
        if checkpoints.is_ingredient(target):
            meta = checkpoints.load_meta(target)
            # Where the data files live may change between machines; what they contain may not.
            refuse_changed(meta.get("config", {}), config, f"the ingredient {target}", ignore=("data.data_dir",))
            print(f"{tag}: finished earlier, skipped", flush=True)
            metas.append(meta)
            continue
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items())
        print(f"{tag}: {shown or 'config as given'}", flush=True)
        meta = train.train_and_evaluate(config, workdir / "train" / name, target, extra_meta={"hparams": hparams})
        m = meta["metrics"]
        print(f"{tag}: held-out {m['heldout']['accuracy']:.4f}  test {m['test']['accuracy']:.4f}  "
              f"({meta['train_seconds']:.0f}s, {meta['train_images_per_second']:.0f} img/s; "
              f"{time.time() - start:.0f}s elapsed) -> {target}", flush=True)
        metas.append(meta)
    return metas
