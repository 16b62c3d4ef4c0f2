"""The init every ingredient of a sweep starts from: model init, then ``init_from``, then the head init.

Training starts each ingredient from it; soups, merges and ``inspect`` rebuild it from an ingredient's
config (theta_0 of the fine-tuning displacements) and check it against the fingerprint the ingredients
were trained from, so it must be rebuilt bit-exactly wherever it is needed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from soupjax.io import trees
from soupjax.io import checkpoints
from soupjax.importers.dispatch import load_pretrained
from soupjax.importers.fingerprint import weights_fingerprint
from soupjax.importers.merge import PretrainedMismatchError, merge_params
from soupjax.importers.activation import resolve_activation
from soupjax.models import build_model_from_run_config

Variables = dict[str, Any]


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """The shape of one batch of one image of ``config.data``, as the model is initialised with."""
    return (1, config.data.image_size, config.data.image_size, config.data.channels)


def base_init(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> Variables:
    """The model init, then ``init_from`` (pretrained weights or an upstream ingredient).

    This is what the init fingerprint is taken of: it is bit-exact wherever it is rebuilt, which the
    linear-probe head (an optimisation) need not be.

    ``init_from.dont_load`` regexes are fully matched against paths within a collection
    (``head/kernel``, not ``params/head/kernel``), in every collection (``params``, ``batch_stats``),
    as ``importers.dispatch.load_pretrained`` names them. From an upstream ingredient a matching leaf always
    keeps its init value (a new task's head is fresh even when it has the upstream head's shape);
    from a .npz or timm file it keeps it only where the file cannot provide it (load_pretrained).
    """
    model = model or build_model_from_run_config(config, resolve_activation(config))
    rng = jax.random.PRNGKey(config.init_seed)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros(input_shape(config), jnp.float32), train=False))(rng)
    variables = jax.device_get(dict(variables))
    path = config.init_from.path
    if not path:
        return variables
    dont_load = tuple(config.init_from.dont_load)
    if not checkpoints.is_ingredient(path):
        return load_pretrained(path, variables, dont_load=dont_load)
    loaded = checkpoints.load_variables(path)
    # One collection at a time, so that the patterns see collection-relative paths; every problem of
    # every collection is reported together, with its collection named.
    merged, problems = {}, []
    for collection, init_tree in variables.items():
        try:
            merged[collection] = merge_params(
                loaded.get(collection, {}), init_tree, dont_load=dont_load, source=str(path))
        except PretrainedMismatchError as err:
            problems += [f"{collection}/{p}" for p in err.problems]
    problems += [f"{c}: collection in the checkpoint but not in the model" for c in loaded
                 if c not in variables and trees.flatten(loaded[c])]
    if problems:
        raise PretrainedMismatchError(str(path), problems)
    return merged


def with_head_init(config: ml_collections.ConfigDict, variables: Variables,
                   model: nn.Module | None = None) -> Variables:
    """Apply ``config.head_init`` to a base init ('default' keeps it; 'linear_probe' fits the head)."""
    if config.head_init == "linear_probe":
        # Imported here: the probe reads the training data, and soupjax.data imports TensorFlow.
        from soupjax.training.linear_probe import fit_head
        return fit_head(model or build_model_from_run_config(config, resolve_activation(config)), variables, config)
    if config.head_init != "default":
        raise ValueError(f"head_init must be 'default' or 'linear_probe', got {config.head_init!r}")
    return variables


def init_variables(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> Variables:
    """The shared starting point of an ingredient: model init, then ``init_from``, then the head init."""
    model = model or build_model_from_run_config(config, resolve_activation(config))
    return with_head_init(config, base_init(config, model), model)


def init_fingerprint(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> str:
    """Fingerprint of the init an ingredient of ``config`` starts from (before the head init)."""
    return weights_fingerprint(base_init(config, model)["params"])


def start_problem(metas: Sequence[Mapping[str, Any]]) -> str | None:
    """Why no one shared start can be named for ingredients with these meta.json contents, or None.

    Read from the metas alone (no model built): every ingredient must record the same ``init_fingerprint``
    and, where recorded, the same ``start_fingerprint`` (the whole start, head init included)."""
    inits = {meta.get("init_fingerprint") for meta in metas}
    if None in inits or "" in inits:
        return "the ingredients' meta.json does not record the init they were fine-tuned from (init_fingerprint)"
    if len(inits) > 1:
        return f"the ingredients were fine-tuned from {len(inits)} different inits (--allow_mixed_init): there is no one θ0"
    starts = {meta.get("start_fingerprint") for meta in metas} - {None}
    if len(starts) > 1:
        return f"the ingredients started from {len(starts)} different points (start_fingerprint: another head init)"
    return None


def rebuild_start(config: ml_collections.ConfigDict, metas: Sequence[Mapping[str, Any]],
                  model: nn.Module | None = None) -> Variables:
    """The variables the ingredients (their meta.json contents ``metas``) started from, rebuilt from
    ``config`` and checked against the fingerprints they recorded: ``init_from``'s weights always, the
    whole start (the head init included) where recorded. ``InputError`` saying why when it cannot be."""
    from soupjax.cli.errors import InputError
    problem = start_problem(metas)
    if problem:
        raise InputError(problem)
    expected, start = metas[0]["init_fingerprint"], metas[0].get("start_fingerprint")
    model = model or build_model_from_run_config(config, resolve_activation(config))
    source = config.init_from.path or "none: the model's random init"
    try:
        base = base_init(config, model)
    except (InputError, OSError, ValueError) as e:  # a missing or mismatched init_from file
        raise InputError(f"the init could not be rebuilt from the ingredients' config (init_from {source}): {e}") from e
    got = weights_fingerprint(base["params"])
    if got != expected:
        raise InputError(f"the init rebuilt from the ingredients' config (init_from {source}) has fingerprint {got}, "
                         f"but they were fine-tuned from an init with fingerprint {expected}")
    variables = with_head_init(config, base, model)
    if start and weights_fingerprint(variables) != start:
        raise InputError(f"the start rebuilt from the ingredients' config (head_init {config.head_init}) has "
                         f"fingerprint {weights_fingerprint(variables)}, but they started from {start}")
    return variables


def start_key(metas: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict) -> str:
    """What names θ0: the fingerprint of the whole start where the ingredients recorded it; for older
    ingredients, their init's fingerprint and what the head init is rebuilt from (config, data, probe)."""
    from soupjax.config.base import fingerprint
    from soupjax.data.pipeline import eval_fingerprint
    start = metas[0].get("start_fingerprint")
    if start:
        return str(start)
    head = fingerprint({"head_init": config.head_init, "probe": config.linear_probe,
                        "data": eval_fingerprint(config.data), "batch": config.eval_batch_size})
    return f"{metas[0].get('init_fingerprint')}-{head}"


def locate_start(ingredients_dir: str | Path, metas: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict,
                 model: nn.Module | None, cache_dir: str | Path) -> tuple[Path | None, str | None]:
    """Where the shared start θ0 of the ingredients under ``ingredients_dir`` (their meta.json contents
    ``metas``) can be read, as an ingredient-format checkpoint: ``(directory, None)``, or ``(None, why)``
    when it cannot be had.

    Rebuilt from ``config`` (``rebuild_start``: checked against the fingerprints the ingredients
    recorded) and kept under ``cache_dir / f"init-{start_key(metas, config)}"``, where a later call finds it.
    """
    from soupjax.cli.errors import InputError
    problem = start_problem(metas)
    if problem:
        return None, problem
    where = Path(cache_dir) / f"init-{start_key(metas, config)}"
    if not checkpoints.is_ingredient(where):
        try:
            variables = rebuild_start(config, metas, model)
        except InputError as e:
            return None, str(e)
        checkpoints.save_ingredient(where, variables, {
            "name": "init", "init_fingerprint": metas[0]["init_fingerprint"],
            "start_fingerprint": metas[0].get("start_fingerprint"), "config": config.to_dict()})
    return where, None
