"""CLIP checkpoints (OpenAI's, open_clip's, transformers') as a source of `load_pretrained`: a
CLIPClassifier's 'visual' params from any file soupjax.importers.clip_checkpoint reads, and its 'head' from a
model-soups ModelWrapper file's classification head (otherwise the head keeps its init).

CLIP shares .pt/.pth/.bin/.safetensors with timm, so the claim looks inside, cheaply: the safetensors
header, or the pickle of a torch zip (no tensor data), for tensors under `visual.` or `vision_model.`; a
directory whose config.json is a transformers CLIP. Anything else is left to the other sources. The
position grid of a checkpoint made for another image size is resampled as open_clip does (bicubic,
antialiased); the activation is not checked here, but where a run's model is built
(clip_checkpoint.stated_activation).
"""

from __future__ import annotations

import functools
import json
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soupjax.importers.clip_checkpoint import (
    STATE_DICT_SUFFIXES,
    image_params_for_model,
    read_clip,
    stated_activation,
)
from soupjax.importers.clip_torch_archive import tensor_shapes
from soupjax.importers.merge import PretrainedMismatchError
from soupjax.importers.sources import Source
from soupjax.io.trees import Tree, flatten

# Tensor-name prefixes of CLIP's image tower: open_clip / OpenAI, and transformers.
_VISION_PREFIXES = ('visual.', 'vision_model.')
# Wrappers a state dict may sit in (training checkpoints, DistributedDataParallel, model-soups).
_WRAPPERS = ('state_dict.', 'state_dict_ema.', 'model.', 'module.')
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not a checkpoint's


def is_clip_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a CLIP checkpoint, by a cheap look: never raises (False when unreadable)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return False
    return _is_clip(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _is_clip(path_name: str, mtime_ns: int, size: int) -> bool:
    del mtime_ns, size  # the cache key: a file rewritten in place is looked at again
    path = Path(path_name)
    try:
        if path.is_dir():
            config = json.loads((path / 'config.json').read_text())
            return config.get('model_type') == 'clip' or 'CLIPModel' in config.get('architectures', [])
        if path.suffix not in STATE_DICT_SUFFIXES:
            return False
        names = _safetensors_names(path) if path.suffix == '.safetensors' else _zip_names(path)
    except Exception:  # noqa: BLE001 - a claim only looks; the reader names what is wrong with the file
        return False
    for name in names:
        for wrapper in _WRAPPERS:
            if name.startswith(wrapper):
                name = name[len(wrapper):]
                break
        if name.startswith(_VISION_PREFIXES):
            return True
    return False


def _safetensors_names(path: Path) -> list[str]:
    with path.open('rb') as file:
        (length,) = struct.unpack('<Q', file.read(8))
        if length > _MAX_HEADER:
            return []
        return [k for k in json.loads(file.read(length)) if k != '__metadata__']


def _zip_names(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return []  # torch's legacy (pre-1.6) format: left to timm's reader
    return list(tensor_shapes(path))


def read(path: Path, init_variables: Mapping[str, Any], model_kind: str | None) -> tuple[str, Tree]:
    """The `Source.read` of CLIP files: {'params': {'visual': ..., 'head': ... (model-soups files)}}."""
    del model_kind  # a CLIP file holds a CLIP
    visual = init_variables.get('params', {}).get('visual')
    if visual is None:
        raise PretrainedMismatchError(str(path), [
            ('the checkpoint is a CLIP, but the model has no CLIP image tower (no visual params): '
             'build a CLIPClassifier (soupjax.models.clip)')])
    query = flatten(visual).get('transformer/resblocks_0/attn/query/kernel')
    heads = query.shape[1] if query is not None else None
    # The activation does not change the weights: take the file's, or QuickGELU for a bare state dict,
    # without read_clip's warning about the latter (training resolves the model's own).
    stated = stated_activation(path)
    ckpt = read_clip(path, activation=stated.name if stated else 'quick_gelu', vision_heads=heads,
                     text=False)
    params: dict[str, Any] = {'visual': image_params_for_model(ckpt, visual)}
    if ckpt.head is not None:
        params['head'] = ckpt.head
    return 'clip', {'params': params}


SOURCE = Source(name='a CLIP checkpoint (OpenAI, open_clip or transformers)', suffixes=STATE_DICT_SUFFIXES,
                read=read, posemb_method='bicubic_antialias', activation=None, accepts=is_clip_checkpoint)
