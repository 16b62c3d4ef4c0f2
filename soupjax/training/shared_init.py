"""The init every ingredient of a sweep starts from: model init, then ``init_from``, then the head init.

Training starts each ingredient from it and writes it once beside the ingredients (``save_start``:
``<ingredients>/start``, fingerprinted); soups, merges and ``inspect`` read it from there
(``locate_start``, ``load_start``: θ0 of the fine-tuning displacements), checked against the fingerprint
the ingredients recorded, so that cooking needs neither ``init_from``'s file nor the training images.
Ingredient directories written before it have the start rebuilt from an ingredient's config
(``rebuild_start``), checked the same way: it must be rebuilt bit-exactly wherever it is needed.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from soupjax.cli.errors import InputError
from soupjax.config.base import check_choice
from soupjax.io import trees
from soupjax.io import checkpoints, files
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
    variables = jax.device_get(dict(_jitted_init(model, input_shape(config))(rng)))
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


@functools.lru_cache(maxsize=8)
def _jitted_init(model: nn.Module, shape: tuple[int, ...]):
    """``model.init`` on zeros of ``shape``, jitted once per (model, shape) in a process: a sweep, a
    resumed run and the start beside the ingredients each ask for the same init, and a new jitted
    function would trace and lower it again before finding the compiled program."""
    return jax.jit(lambda rng: model.init(rng, jnp.zeros(shape, jnp.float32), train=False))


def with_head_init(config: ml_collections.ConfigDict, variables: Variables,
                   model: nn.Module | None = None, *, cache_dir: str | Path | None = None) -> Variables:
    """Apply ``config.head_init`` to a base init ('default' keeps it; 'linear_probe' fits the head;
    'zeroshot' sets CLIP's zero-shot head, kept in ``cache_dir`` (the ingredients' folder) once computed)."""
    choice = check_choice("head_init", config.head_init)
    if choice == "zeroshot":
        return _with_zeroshot_head(config, variables, cache_dir)
    if choice == "linear_probe":
        # Imported here: the probe reads the training data, and soupjax.data imports TensorFlow.
        from soupjax.training.linear_probe import fit_head
        return fit_head(model or build_model_from_run_config(config, resolve_activation(config)), variables, config)
    return variables


def _with_zeroshot_head(config: ml_collections.ConfigDict, variables: Variables,
                        cache_dir: str | Path | None) -> Variables:
    if "clip" not in config.model.name.lower() or not config.init_from.path:
        raise InputError(f"head_init='zeroshot' needs a CLIP model (config.model.name clip-...) started from a CLIP "
                         f"checkpoint (config.init_from.path); got model {config.model.name!r}, "
                         f"init_from {config.init_from.path or 'none'!r}")
    # Imported here: the class names may come from the data set's builder (TensorFlow).
    from soupjax.training.zeroshot import zeroshot_start_head
    head = zeroshot_start_head(config, cache_dir)
    have = variables["params"]["head"]
    for name, value in head.items():
        if tuple(have[name].shape) != value.shape:
            raise InputError(f"head_init='zeroshot': the zero-shot head/{name} has shape {value.shape}, the model's "
                             f"{tuple(have[name].shape)} (another embedding width or class count)")
    params = {**variables["params"], "head": {k: jnp.asarray(v, have[k].dtype) for k, v in head.items()}}
    return {**variables, "params": params}


def start_problem(metas: Sequence[Mapping[str, Any]]) -> str | None:
    """Why no one shared start can be named for ingredients with these meta.json contents, or None.

    Read from the metas alone (no model built): every ingredient must record the same ``init_fingerprint``
    and, where recorded, the same ``start_fingerprint`` (the whole start, head init included)."""
    inits = {meta.get("init_fingerprint") for meta in metas}
    if None in inits or "" in inits:
        # Imported ingredients say why they have no start (model-soups files imported without --base).
        note = next((m["start_note"] for m in metas if m.get("start_note")), None)
        return note or "the ingredients' meta.json does not record the init they were fine-tuned from (init_fingerprint)"
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
    from soupjax.config.base import eval_fingerprint
    start = metas[0].get("start_fingerprint")
    if start:
        return str(start)
    head = fingerprint({"head_init": config.head_init, "probe": config.linear_probe,
                        "data": eval_fingerprint(config.data), "batch": config.eval_batch_size})
    return f"{metas[0].get('init_fingerprint')}-{head}"


# The start training writes beside the ingredients: ``<ingredients_dir>/start``, an ingredient-format
# checkpoint whose meta.json has kind ``checkpoints.START_KIND`` (so that no listing of ingredients takes it).
START_DIR = "start"


def start_directory(ingredients_dir: str | Path) -> Path:
    """Where the shared start of the ingredients under ``ingredients_dir`` is written and read
    (``<ingredients_dir>/start``; beside it when ``ingredients_dir`` is one ingredient)."""
    directory = files.as_path(ingredients_dir)  # a gs:// URL stays one
    if checkpoints.is_ingredient(directory) and not checkpoints.is_start(directory):
        directory = directory.parent
    return directory / START_DIR


def save_start(directory: str | Path, variables: Variables, *, config: ml_collections.ConfigDict,
               init_fingerprint: str, start_fingerprint: str, activation: str | None = None) -> bool:
    """Write the start ``variables`` (fingerprint ``start_fingerprint``) at ``directory`` atomically,
    unless the start there already has that fingerprint; True when written.

    A start of another fingerprint is replaced: the ingredients now being made start from this one.
    Every process calls it (the save is collective); they all read the same meta.json to decide."""
    directory = files.as_path(directory)  # a gs:// URL stays one
    if _has_start(directory, start_fingerprint):
        return False
    try:
        checkpoints.save_ingredient(directory, variables, {
            "name": START_DIR, "kind": checkpoints.START_KIND, "init_fingerprint": init_fingerprint,
            "start_fingerprint": start_fingerprint, "activation": activation, "config": config.to_dict()})
    except OSError:
        # Machines splitting one sweep with --only may write the same start at the same moment: the
        # one that loses the race finds the winner's, which is the same start, and goes on.
        if _has_start(directory, start_fingerprint):
            return False
        raise
    return True


def _has_start(directory: Path, start_fingerprint: str) -> bool:
    """Whether ``directory`` holds a finished start of fingerprint ``start_fingerprint``."""
    if not (checkpoints.is_start(directory) and checkpoints.is_ingredient(directory)):
        return False
    try:
        return checkpoints.load_meta(directory).get("start_fingerprint") == start_fingerprint
    except checkpoints.IngredientError:
        return False  # unreadable: written again


def _stored_start(ingredients_dir: str | Path, metas: Sequence[Mapping[str, Any]]
                  ) -> tuple[Path | None, Variables | None, str | None]:
    """The start training wrote beside the ingredients, read and checked against the fingerprint they
    recorded: ``(directory, variables, None)``; ``(None, None, None)`` when there is none to read
    (ingredient directories written before it, ingredients that recorded no start_fingerprint);
    ``(None, None, why)`` when it is there but damaged or another start."""
    where, expected = start_directory(ingredients_dir), metas[0].get("start_fingerprint")
    if not expected or not where.exists():
        return None, None, None
    remedy = "move it away to rebuild the start from the ingredients' config"
    try:
        meta = checkpoints.load_meta(where)
        if meta.get("kind") != checkpoints.START_KIND:
            return None, None, f"{where} is not a shared start (its meta.json has kind {meta.get('kind')!r}): {remedy}"
        if meta.get("start_fingerprint") != expected:
            return None, None, (f"the shared start {where} has start_fingerprint {meta.get('start_fingerprint')}, but "
                                f"the ingredients started from {expected}: {remedy}")
        # One array at a time through TensorStore, not an orbax restore: a damaged file then ends the
        # read cleanly (a failed restore leaves reads in flight on its event loop).
        source = checkpoints.tensor_source(where)
        variables = trees.unflatten({path: source.read(path) for path in source.paths})
    except (InputError, FileNotFoundError) as e:
        return None, None, f"the shared start {where} cannot be read ({e}): {remedy}"
    got = weights_fingerprint(variables)
    if got != expected:
        return None, None, (f"the shared start {where} is damaged: its variables have fingerprint {got}, but it and "
                            f"the ingredients record {expected}: {remedy}")
    return where, variables, None


def locate_start(ingredients_dir: str | Path, metas: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict,
                 model: nn.Module | None, cache_dir: str | Path) -> tuple[Path | None, str | None]:
    """Where the shared start θ0 of the ingredients under ``ingredients_dir`` (their meta.json contents
    ``metas``) can be read, as an ingredient-format checkpoint: ``(directory, None)``, or ``(None, why)``
    when it cannot be had.

    The start training wrote beside them (``start_directory``), checked against the ``start_fingerprint``
    they recorded (a damaged or other start is refused, naming it). Without one (ingredient directories
    written before it), rebuilt from ``config`` (``rebuild_start``, which needs ``init_from``'s file and,
    for a linear-probe head, the training images) and kept under
    ``cache_dir / f"init-{start_key(metas, config)}"``, where a later call finds it.
    """
    problem = start_problem(metas)
    if problem:
        return None, problem
    stored, _, problem = _stored_start(ingredients_dir, metas)
    if problem or stored:
        return stored, problem
    where = files.as_path(cache_dir) / f"init-{start_key(metas, config)}"
    if not checkpoints.is_ingredient(where):
        try:
            variables = rebuild_start(config, metas, model)
        except InputError as e:
            return None, str(e)
        checkpoints.save_ingredient(where, variables, {
            "name": "init", "init_fingerprint": metas[0]["init_fingerprint"],
            "start_fingerprint": metas[0].get("start_fingerprint"), "config": config.to_dict()})
    return where, None


def load_start(ingredients_dir: str | Path, metas: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict,
               model: nn.Module | None = None) -> Variables:
    """The shared start's variables, found as ``locate_start`` finds it but without a cache directory (a
    start rebuilt from ``config`` is not kept); ``InputError`` saying why when it cannot be had."""
    problem = start_problem(metas)
    if problem:
        raise InputError(problem)
    _, variables, problem = _stored_start(ingredients_dir, metas)
    if problem:
        raise InputError(problem)
    return variables if variables is not None else rebuild_start(config, metas, model)
