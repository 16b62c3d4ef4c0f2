"""`load_pretrained`: a pretrained checkpoint, of whichever source, into the variables of a soupjax model.

    variables = model.init(rng, images)            # or jax.eval_shape(model.init, rng, images)
    variables = load_pretrained('ViT-B_16.npz', variables)        # head re-initialised if needed

The file's source (a module of soupjax.importers.sources) is told by its name (and where sources share a
suffix, as CLIP's and timm's .pt and .safetensors, by a cheap look at its tensor names); the source reads it
into soupjax's tree, the position embedding is resampled as that source's own loader does, and the
strict merge (importers.merge) takes every parameter from it or names each one that does not fit.
Our own Orbax checkpoints are read by soupjax.io.checkpoints, not here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from soupjax.io import files
from soupjax.importers.merge import PretrainedMismatchError, merge_collection, unfit_paths
from soupjax.importers.posemb import resample_to_model
from soupjax.importers.sources import Source, all_sources
from soupjax.io.trees import Tree, flatten, unflatten


def source_of(path: str | Path) -> Source | None:
    """The source that claims ``path`` (by its name, or a cheap look at it: no tensor data is read);
    None if no source claims it."""
    path = Path(path)
    for source in all_sources():
        if source.claims(path):
            return source
    return None


def known_suffixes() -> list[str]:
    """Every file suffix some source claims, for messages."""
    return list(dict.fromkeys(suffix for source in all_sources() for suffix in source.suffixes))


def load_pretrained(path: str | Path, init_variables: Mapping[str, Any], *,
                    dont_load: Iterable[str] = ('head/.*',), model_kind: str | None = None,
                    reinit: Iterable[str] = (), posemb_method: str | None = None,
                    posemb_grid: tuple[int, int] | None = None) -> Tree:
    """Loads a pretrained checkpoint into the variables of a soupjax model.

    Args:
      path: a vision_transformer/big_vision `.npz` (ViT), or a timm `.safetensors`, `.pth`,
        `.pt`, `.bin` (ViT or ResNet, told apart by their keys unless model_kind says), or a CLIP
        checkpoint for a CLIPClassifier (an OpenAI/open_clip state dict or TorchScript archive, a
        transformers CLIPModel directory); any file a module of soupjax.importers.sources claims.
        Local, or a URL (gs://...), which is read through a local copy (files.local_copy).
      init_variables: the model's variables from `model.init` (or `jax.eval_shape(model.init,
        ...)` when nothing is kept from init); they fix every shape.
      dont_load: regexes (full match on '/'-joined paths within a collection) of parameters the
        checkpoint may fail to provide: when such a parameter is missing from the checkpoint, has
        another shape (a head for another number of classes) or is extra (e.g. a `pre_logits`
        the model lacks), the init value is kept. When it fits, it IS loaded, so that an
        ImageNet-fine-tuned checkpoint evaluated on ImageNet keeps its head by default.
      model_kind: 'vit' or 'resnet' to skip detection.
      reinit: regexes of parameters that always keep the init value, even when they fit.
      posemb_method: how the position embedding is resampled when the checkpoint's grid differs
        from the model's (a model made for another resolution), one of posemb.POSEMB_METHODS. None
        (default) does what the checkpoint's source does: 'bilinear_align_corners' for .npz
        (vision_transformer, big_vision), 'bicubic_antialias' for timm files (timm).
      posemb_grid: the model's grid (h, w) when it is not square.

    Returns:
      variables with the collections of init_variables ('params', and 'batch_stats' for ResNet).

    Raises:
      FileNotFoundError: no file at path.
      InputError: the file is not plain data: a pickle that torch.load(weights_only=True) refuses,
        an .npz with a pickled object array, an unreadable safetensors header. Nothing in it ran.
      PretrainedMismatchError: the checkpoint does not fit; the message lists every problem.
    """
    options = dict(dont_load=dont_load, model_kind=model_kind, reinit=reinit, posemb_method=posemb_method,
                   posemb_grid=posemb_grid)
    if not files.as_path(path).exists():
        raise FileNotFoundError(f'pretrained checkpoint not found: {path}')
    # gs://...: read through a local copy (the readers take local files, and read them whole anyway).
    with files.local_copy(path) as local:
        return _load(local, str(path), init_variables, **options)


def _load(path: Path, source_name: str, init_variables: Mapping[str, Any], *, dont_load: Iterable[str],
          model_kind: str | None, reinit: Iterable[str], posemb_method: str | None,
          posemb_grid: tuple[int, int] | None) -> Tree:
    """``load_pretrained`` of the local file ``path``, named ``source_name`` in errors."""
    source = source_of(path)
    if source is None:
        raise ValueError(f'{source_name}: unknown checkpoint format {path.suffix!r} '
                         f'(expected one of {known_suffixes()})')
    kind, loaded = source.read(path, init_variables, model_kind)

    model_is_vit = 'embedding' in init_variables.get('params', {})
    if model_is_vit != (kind == 'vit'):
        raise PretrainedMismatchError(source_name, [
            f"the checkpoint is a {kind} but the model is {'a ViT' if model_is_vit else 'not'}"])
    model_is_clip = 'visual' in init_variables.get('params', {})
    if model_is_clip != (kind == 'clip'):
        raise PretrainedMismatchError(source_name, [
            f"the checkpoint is a {kind} but the model is {'a CLIP' if model_is_clip else 'not'}"])
    if kind == 'vit':
        resample_to_model(loaded['params'], init_variables['params'],
                          posemb_method or source.posemb_method, posemb_grid)

    merged, problems = {}, []
    for collection, init_tree in init_variables.items():
        label = '' if collection == 'params' else f'{collection}/'
        loaded_tree = loaded.get(collection, {})
        keep = list(reinit) + unfit_paths(loaded_tree, init_tree, dont_load)
        merged[collection], found = merge_collection(loaded_tree, init_tree, keep, label)
        problems += found
    for collection in loaded:
        if collection not in init_variables and flatten(loaded[collection]):
            problems.append(f'{collection}: collection in the checkpoint but not in the model')
    if problems:
        raise PretrainedMismatchError(source_name, problems)
    return {collection: unflatten(flat) for collection, flat in merged.items()}
