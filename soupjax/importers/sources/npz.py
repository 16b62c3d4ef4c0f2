"""vision_transformer / big_vision `.npz` checkpoints (ViTs), read as data and renamed to soupjax's tree.

vision_transformer's names are soupjax's (models/vit.py); big_vision's are renamed. Its ViTs ran
Flax's nn.gelu, whose default is the tanh approximation, and its loader resamples position
embeddings with scipy.ndimage.zoom(order=1) ('bilinear_align_corners').
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.cli.errors import InputError
from soupjax.importers.posemb import POSEMB_PATH
from soupjax.importers.sources import Source, first_line
from soupjax.io.trees import Tree, unflatten


def load_npz(path: str | Path) -> Tree:
    """Reads a vision_transformer or big_vision `.npz` into a nested params tree.

    Keys are '/'-joined paths. big_vision files may prefix them with 'params/' (and hold other
    state, dropped here). big_vision's own ViT names are renamed to vision_transformer's: its
    top-level `pos_embedding` (added before the class token, so one row short) becomes
    `Transformer/posembed_input/pos_embedding` with a zero row for the class token, its
    `MultiHeadDotProductAttention_0`, `LayerNorm_1` and `MlpBlock_0` become `_1`, `_2`, `_3`, and
    a scanned `Transformer/encoderblock` (layers stacked on axis 0) is split into
    `encoderblock_{i}`.
    """
    flat = _read_npz(path)
    if any(k.startswith('params/') for k in flat):
        flat = {k[len('params/'):]: v for k, v in flat.items() if k.startswith('params/')}
    return unflatten(_big_vision_to_vit_names(flat))


def _read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz`, read as data: a pickled object array is refused, never unpickled.

    np.load(allow_pickle=False) raises when it meets a pickle; the errors it raises do not name the
    file or the array, so they are turned into one InputError that does.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # A pickle or .npy saved under an .npz name lands here too ("Cannot load file containing
        # pickled data when allow_pickle=False"): np.load refused it before unpickling anything.
        raise InputError(f'{path}: not a readable .npz archive of arrays ({first_line(e)})') from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f'{path}: a single .npy array, not an .npz archive of named arrays')
    flat = {}
    with archive:
        for key in archive.files:
            try:
                flat[key] = archive[key]
            except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
                raise InputError(
                    f'{path}: array {key!r} is a pickled object array, not numbers; soupjax reads '
                    f'.npz files with allow_pickle=False and did not unpickle it ({first_line(e)})') from None
    return flat



def _big_vision_to_vit_names(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames big_vision's ViT parameters to vision_transformer's; a no-op for the latter."""
    out: dict[str, np.ndarray] = {}
    scanned = 'Transformer/encoderblock/'
    for path, value in flat.items():
        if path.startswith(scanned):
            # nn.scan stacks the layers on a leading axis.
            for i, layer in enumerate(value):
                out[f'Transformer/encoderblock_{i}/{path[len(scanned):]}'] = layer
        else:
            out[path] = value

    renames = {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
               'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}
    if any('/MlpBlock_0/' in p for p in out if p.startswith('Transformer/encoderblock_')):
        renamed = {}
        for path, value in out.items():
            parts = path.split('/')
            in_block = parts[0] == 'Transformer' and parts[1].startswith('encoderblock_')
            if len(parts) > 2 and in_block:
                parts[2] = renames.get(parts[2], parts[2])
            renamed['/'.join(parts)] = value
        out = renamed

    for old in ('pos_embedding', 'Transformer/pos_embedding'):
        if old in out:
            posemb = out.pop(old)
            if 'cls' in out:
                posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
            out[POSEMB_PATH] = posemb
    return out


def read(path: Path, init_variables: Mapping[str, Any], model_kind: str | None) -> tuple[str, Tree]:
    """The `Source.read` of `.npz` files: always a ViT's {'params': ...}."""
    del init_variables  # the names and shapes are the file's own
    if model_kind not in (None, 'vit'):
        raise ValueError(f'{path}: .npz files hold vision_transformer ViTs, not {model_kind}')
    return 'vit', {'params': load_npz(path)}


SOURCE = Source(name='a vision_transformer/big_vision .npz', suffixes=('.npz',), read=read,
                posemb_method='bilinear_align_corners', activation='gelu_tanh')
