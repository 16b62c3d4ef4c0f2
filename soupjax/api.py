"""soupjax from Python (a notebook, a script): load ingredients, merge them, evaluate, cook a recipe.

    from soupjax import api
    ingredients = api.load_ingredients("runs/soupjax/ingredients")
    soup = api.merge("uniform", ingredients)                        # a variables pytree, nothing chosen
    ties = api.merge("ties", ingredients, density=0.2, lam=1.0)     # fixed hyperparameters
    print(api.evaluate(soup, ingredients, split="test"))            # {'accuracy': ..., 'loss': ...}
    results = api.cook("greedy", "runs/soupjax/ingredients", "runs/soupjax/soups")   # what the CLI does

CLIP files (OpenAI's, open_clip's, a transformers directory) and the released model-soups ingredients:

    tokens = api.tokenize("ViT-B-32.pt", ["a photo of a cat."])      # int32 [N, 77], as open_clip's
    text = api.encode_text("ViT-B-32.pt", tokens)                     # [N, E], unnormalised
    image = api.encode_image("ViT-B-32.pt", images)                   # NHWC float32, preprocessed
    W = api.zeroshot_head("ViT-B-32.pt", ["cat", "dog"], ["a photo of a {}."])   # [E, C], unit columns
    api.import_ingredients(["model_0.pt", ...], "ingredients", base="ViT-B-32.pt")
    logits = api.predict("ingredients/model_0", images)               # a saved ingredient or soup

``merge`` computes one model with the hyperparameters you give (no held-out search, nothing written);
``cook`` is ``python -m soupjax.soup``: held-out grids, evaluations, saved soups and the report, with
the same options by the same names (``api.recipes()`` lists the methods, ``methods.all_options()`` the
options). Everything here is a thin layer over the modules the command line uses.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from soupjax import methods
from soupjax.io import checkpoints
from soupjax.cooking import preflight
from soupjax.arithmetic import soups as soup_arithmetic
from soupjax.cli.errors import InputError

Variables = Mapping[str, Any]

def recipes() -> dict[str, str]:
    """Every method ``cook`` knows, with its one-line summary (``--recipe`` names, in cooking order)."""
    return {m.name: m.summary for m in methods.methods()}


def load_ingredients(directory: str | Path, *, allow_mixed_init: bool = False) -> list[preflight.Ingredient]:
    """The ingredients under ``directory``, checked as cooking checks them (``InputError`` naming a
    missing, half-written or incompatible one). Each has ``name``, ``path``, ``meta`` and ``load()``."""
    return preflight.gather(directory, allow_mixed_init=allow_mixed_init)


def config_of(ingredients: Sequence[preflight.Ingredient]) -> ConfigDict:
    """The config the ingredients were fine-tuned with (model, data, init), from the first one's meta.json."""
    return ConfigDict(ingredients[0].meta["config"])


def shared_init(ingredients: Sequence[preflight.Ingredient]) -> Variables:
    """The variables the ingredients started from (``init_from``, then the head init): the start training
    wrote beside them, or else rebuilt from their config, checked against the fingerprints they recorded;
    ``InputError`` saying why when it cannot be."""
    from soupjax.training import shared_init as init_module
    try:
        return init_module.load_start(ingredients[0].path.parent, [ing.meta for ing in ingredients], config_of(ingredients))
    except InputError as e:
        raise InputError(f"{e}: pass init= to merge() yourself") from e


def merge(method: str, ingredients: Sequence[preflight.Ingredient], *, init: Variables | None = None,
          **hyperparameters: Any) -> Variables:
    """One model from ``ingredients`` by ``method`` with fixed ``hyperparameters``, streamed per tensor.

    The method is the registry's (``soupjax.methods``): the model is the one its recipe builds for the
    same point of its grid, bit for bit, as a one-point grid of ``cook`` would choose it. 'uniform' needs
    no init and no hyperparameters; the merges ('task_arithmetic' (lam), 'ties' (density, lam),
    'dare_linear' and 'dare_ties' (p, lam, seed, default 0), 'slerp' (t; between the two best
    ingredients by the held-out accuracy each recorded in its meta.json, equal ones in ingredient order,
    as cooking ranks them), 'spherical_mean', 'model_stock') work on displacements from ``init``
    (default: ``shared_init(ingredients)``), a variables tree with the ingredients' structure, held in
    memory; the ingredients are read from disk one tensor at a time. ``lam`` is λ as the recipe's grid
    records it (task arithmetic and DARE linear: λ itself, not the scale λ·K). Conventions:
    ``soupjax.arithmetic.merging``.
    """
    found = methods.method_of_dish(method)
    if found is None or found.merge is None:
        merges = [d for m in methods.methods() if m.merge for d in m.merge.hyperparameters]
        raise InputError(f"merge: unknown method {method!r}; choose from {', '.join(merges)} (the selecting "
                         "recipes, greedy/pruned/learned/WiSE-FT, choose on held-out data: use cook)")
    names = found.merge.hyperparameters[method]
    unknown = sorted(set(hyperparameters) - set(names))
    missing = [n for n in names if n != "seed" and n not in hyperparameters]
    if unknown or missing:
        said = "; ".join([*([f"unknown hyperparameter(s) {', '.join(unknown)}"] if unknown else []),
                          *([f"missing {', '.join(missing)}"] if missing else [])])
        raise InputError(f"merge({method!r}): {said}; it takes {', '.join(names) or 'none'}")
    # The one point of the method's grid, named as the grid names it (lam is the grid's 'lambda').
    point = {("lambda" if n == "lam" else n): float(hyperparameters[n]) for n in names if n != "seed"}
    heldout = [ing.heldout_accuracy for ing in ingredients]
    if found.merge.pick is not None:  # SLERP: the two best, as cooking picks them
        if len(ingredients) < 2:
            raise InputError(f"merge({method!r}) interpolates between two ingredients, got {len(ingredients)}")
        unrecorded = [ing.name for ing, h in zip(ingredients, heldout) if h is None]
        if unrecorded:
            raise InputError(f"merge({method!r}) picks the two best ingredients by held-out accuracy, which the "
                             f"meta.json of {', '.join(unrecorded)} does not record (metrics.heldout.accuracy)")
    picked = found.merge.chosen(heldout)
    sources = [checkpoints.tensor_source(ingredients[i].path) for i in picked]
    init_source = None
    if found.needs_init:
        init_source = soup_arithmetic.TreeSource(init if init is not None else shared_init(ingredients))
    return found.merge.build(method, point, init_source, sources, int(hyperparameters.get("seed", 0)))


def evaluate(variables: Variables, ingredients_or_config: Sequence[preflight.Ingredient] | ConfigDict, *,
             split: str = "test", batch_size: int | None = None) -> dict[str, float]:
    """Accuracy and loss of ``variables`` on ``split`` ('heldout', 'test' or a shift split) of the data the
    ingredients were fine-tuned on (or of ``config``), jitted and data-parallel over every device."""
    from soupjax import data, models
    from soupjax.evaluation import evaluate as evaluation
    if isinstance(ingredients_or_config, ConfigDict):  # a run's config: its activation as training resolves it
        from soupjax.importers.activation import resolve_activation
        config, activation = ingredients_or_config, resolve_activation(ingredients_or_config)
    else:  # the activation the ingredients were trained with, as their meta.json records it
        config, activation = config_of(ingredients_or_config), ingredients_or_config[0].meta.get("activation")
    evaluator = evaluation.for_model(models.build_model_from_run_config(config, activation))
    result = evaluator(dict(variables), data.eval_batches(config.data, split, batch_size or config.eval_batch_size),
                       projection=data.logit_projection(config.data, split))
    return {"accuracy": float(result.accuracy), "loss": float(result.loss)}


def cook(recipe: str, ingredients_dir: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """What ``python -m soupjax.soup --recipe RECIPE`` does for any recipe but 'inspect' (``cooking.cook``):
    the results dict of its report. ``options`` by the command line's names, e.g. ``ties_densities="0.2,0.5"``, ``shifts=[]``."""
    from soupjax import cooking
    return cooking.cook(recipe, Path(ingredients_dir), Path(out), **options)


def load_model(directory: str | Path) -> tuple[Variables, dict[str, Any]]:
    """A saved ingredient or soup: its variables and its meta.json."""
    return checkpoints.load_variables(directory), checkpoints.load_meta(directory)


# ------------------------------------------------------------------------------------------------ CLIP

Checkpoint = Any  # a CLIP file or directory (str / Path), or a ClipCheckpoint read already


def _checkpoint(checkpoint: Checkpoint, *, text: bool = True) -> Any:
    """The ClipCheckpoint at ``checkpoint`` (read once per file and process: ``_read_cached``)."""
    from soupjax.importers.clip_checkpoint import ClipCheckpoint
    if isinstance(checkpoint, ClipCheckpoint):
        return checkpoint
    path = Path(checkpoint).absolute()
    if not path.exists():
        raise InputError(f"CLIP checkpoint {path}: no such file or directory")
    stat = path.stat()
    return _read_cached(str(path), stat.st_mtime_ns, stat.st_size, text)


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, mtime_ns: int, size: int, text: bool) -> Any:
    del mtime_ns, size  # the cache key: a file rewritten in place is read again
    from soupjax.importers.clip_checkpoint import read_clip
    return read_clip(path, text=text)


def _text_checkpoint(checkpoint: Checkpoint) -> Any:
    ckpt = _checkpoint(checkpoint)
    if ckpt.text_params is None:
        raise InputError(f"{ckpt.path}: has no text tower (a fine-tuned model-soups file?): give the CLIP file "
                         "it was fine-tuned from")
    return ckpt


def tokenize(checkpoint: Checkpoint, texts: str | Sequence[str]) -> np.ndarray:
    """``texts`` as CLIP's tokens, int32 [N, context length] (77), token for token as ``open_clip.tokenize``;
    the tokenizer is read from the files beside ``checkpoint`` (``ClipTokenizer.from_path``)."""
    from soupjax.text.clip_tokenizer import ClipTokenizer
    ckpt = _checkpoint(checkpoint)
    context = ckpt.text.context_length if ckpt.text is not None else 77
    return ClipTokenizer.from_path(ckpt.path).tokenize(texts, context_length=context)


@functools.lru_cache(maxsize=4)
def _jitted_apply(module: Any) -> Any:
    import jax
    return jax.jit(lambda params, x: module.apply({"params": params}, x))


def encode_image(checkpoint: Checkpoint, images: Any) -> np.ndarray:
    """CLIP's image features, float32 [B, E], unnormalised (open_clip's ``encode_image``), of ``images``:
    NHWC float32, already preprocessed (resized, centre-cropped, CLIP's mean and std)."""
    ckpt = _checkpoint(checkpoint)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"encode_image: images must be NHWC with 3 channels, got shape {images.shape}")
    return np.asarray(_jitted_apply(ckpt.image_encoder())(ckpt.image_params, images))


def encode_text(checkpoint: Checkpoint, tokens: Any) -> np.ndarray:
    """CLIP's text features, float32 [N, E], unnormalised (open_clip's ``encode_text``), of ``tokens``
    (int [N, L], as ``tokenize`` makes them)."""
    from soupjax.training.zeroshot import encode_texts
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"encode_text: tokens must be integers [N, L], got {tokens.dtype} {tokens.shape}")
    return encode_texts(_text_checkpoint(checkpoint), tokens.astype(np.int32))


def zeroshot_head(checkpoint: Checkpoint, classnames: Sequence[str],
                  templates: Sequence[str] = ("a photo of a {}.",)) -> np.ndarray:
    """CLIP's zero-shot classifier, float32 [E, C] with unit columns, as open_clip's
    ``build_zero_shot_classifier``: column c is the normalised mean of the normalised text features of
    every template (``{}`` for the class name) filled with ``classnames[c]``. The head fine-tuning starts
    from is 100 x it (``training.zeroshot.head_variables``)."""
    from soupjax.text.clip_tokenizer import ClipTokenizer
    from soupjax.training import zeroshot
    ckpt = _text_checkpoint(checkpoint)
    return zeroshot.zeroshot_head(ckpt, ClipTokenizer.from_path(ckpt.path), list(classnames), list(templates))


def import_ingredients(files: Sequence[str | Path], out: str | Path, *, format: str = "model-soups",
                       base: str | Path | None = None, config: str | ConfigDict | None = None,
                       classnames: str | Path | None = None, templates: str | Path | None = None,
                       tokenizer: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """What ``python -m soupjax.import_ingredients`` does: each released file (``format`` 'model-soups':
    the official ``model_{i}.pt``) becomes the ingredient ``out/<stem>``; with ``base`` (the CLIP they
    were fine-tuned from) ``out/start`` is the zero-shot start the merges and WiSE-FT need. ``config``
    is a ConfigDict or ``"FILE[:options]"`` (default configs/imagenet_clip_vit_b32.py); ``classnames``,
    ``templates``, ``tokenizer`` are files for the zero-shot head. Returns the ingredients' directories."""
    from soupjax.importers import model_soups
    if format not in model_soups.FORMATS:
        raise InputError(f"import_ingredients: unknown format {format!r}; known: {', '.join(model_soups.FORMATS)}")
    if isinstance(config, str):
        from soupjax.config.base import load_config
        config = load_config(config)
    return model_soups.import_model_soups(files, out, config=config, base=base, classnames=classnames,
                                          templates=templates, tokenizer=tokenizer, overwrite=overwrite)


def _activation_of(meta: Mapping[str, Any], config: ConfigDict) -> str | None:
    """The activation a saved model runs: its meta.json's (an ingredient), else that of the first
    ingredient it was cooked from (a soup records their paths), else what its config resolves to."""
    if meta.get("activation"):
        return str(meta["activation"])
    for path in (meta.get("options") or {}).get("ingredients") or []:
        if checkpoints.is_ingredient(path):
            recorded = checkpoints.load_meta(path).get("activation")
            if recorded:
                return str(recorded)
        break
    from soupjax.importers.activation import resolve_activation
    return resolve_activation(config) if config.init_from.path and Path(config.init_from.path).exists() else None


def predict(model: str | Path | Variables, images: Any, *,
            ingredients: Sequence[preflight.Ingredient] | None = None) -> np.ndarray:
    """Logits, float32 [B, C], of ``model`` on ``images`` (NHWC float32, already preprocessed as the model's
    data config does), in evaluation mode.

    ``model`` is a saved ingredient or soup directory (its meta.json says the architecture), or variables
    in memory (what ``merge`` returns) together with the ``ingredients`` they were made from."""
    from soupjax import models
    from soupjax.io.trees import flatten
    if isinstance(model, (str, Path)):
        variables, meta = load_model(model)
        config = ConfigDict(meta["config"])
        activation = _activation_of(meta, config)
    else:
        if not ingredients:
            raise InputError("predict: variables in memory need the ingredients they were made from "
                             "(ingredients=...), whose meta.json says the architecture")
        variables, config = model, config_of(ingredients)
        activation = ingredients[0].meta.get("activation")
    heads = [shape for path, shape in ((p, np.shape(v)) for p, v in flatten(variables).items())
             if path.endswith("head/bias")]
    if heads:
        num_classes = int(heads[0][-1])
    else:
        from soupjax import data
        num_classes = data.num_classes(config.data)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise InputError(f"predict: images must be NHWC, got shape {images.shape}")
    module = models.build_model(config.model, num_classes, activation)
    return np.asarray(_jitted_eval(module)(dict(variables), images), np.float32)


@functools.lru_cache(maxsize=4)
def _jitted_eval(module: Any) -> Any:
    import jax
    from soupjax.evaluation.evaluate import apply_for_eval
    return jax.jit(apply_for_eval(module))
