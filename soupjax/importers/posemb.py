"""Position-embedding resampling: a checkpoint made for another resolution, fitted to the model's grid.

A checkpoint made for another resolution has another grid of position embeddings, which is
resampled to the model's. Each source does it its own way, and we do as the source did:
  vision_transformer and big_vision (.npz): scipy.ndimage.zoom(grid, order=1), i.e. linear
    interpolation with the corner samples aligned (vit_jax/checkpoint.py load_pretrained,
    big_vision/models/vit.py resample_posemb);
  timm state dicts: timm.layers.resample_abs_pos_embed as timm's checkpoint_filter_fn calls it,
    F.interpolate(mode='bicubic', align_corners=False, antialias=True).
jax.image.resize has no corner-aligned mode, and its 'cubic' is the antialiased kind (Keys'
a = -0.5, weights renormalised at the edges: timm's default, but in float32), not PyTorch's
plain bicubic (a = -0.75, out-of-grid taps clamped to the edge sample). So every variant is
written out below as an [out, in] weight matrix per axis, applied separably in float64, and
tests/test_pretrained.py compares each with scipy / PyTorch in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from soupjax.io.trees import Tree, flatten

# Where a ViT keeps its position embedding [1, prefix + h*w, D] (vision_transformer's name).
POSEMB_PATH = 'Transformer/posembed_input/pos_embedding'

# posemb_method -> what it reproduces.
POSEMB_METHODS: dict[str, str] = {
    'bilinear_align_corners': 'scipy.ndimage.zoom(order=1), as vision_transformer and big_vision',
    'bilinear': "F.interpolate(mode='bilinear', align_corners=False, antialias=False)",
    'bicubic': "F.interpolate(mode='bicubic', align_corners=False, antialias=False)",
    'bicubic_antialias': "F.interpolate(mode='bicubic', align_corners=False, antialias=True), "
                         "as timm's checkpoint_filter_fn",
}


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (support [-2, 2])."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_weights(n_in: int, n_out: int, method: str) -> np.ndarray:
    """The [n_out, n_in] float64 matrix that resamples one axis of length n_in to n_out.

    Follows the index arithmetic of scipy.ndimage.zoom (order=1, grid_mode=False) and of PyTorch's
    upsample kernels (aten/src/ATen/native/UpSample.h, cpu/UpSampleKernel.cpp) with
    align_corners=False and an output size given (scale = n_in / n_out).
    """
    if method not in POSEMB_METHODS:
        raise ValueError(f'posemb_method must be one of {sorted(POSEMB_METHODS)}, got {method!r}')
    out = np.arange(n_out, dtype=np.float64)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)

    if method == 'bilinear_align_corners':
        # zoom maps output o to input o * (n_in - 1) / (n_out - 1) (factor 1 for a single output).
        src = out * ((n_in - 1) / (n_out - 1) if n_out > 1 else 1.0)
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        frac = src - lo
        np.add.at(weights, (rows, lo), 1 - frac)
        np.add.at(weights, (rows, np.minimum(lo + 1, n_in - 1)), frac)
        return weights

    scale = n_in / n_out
    if method == 'bilinear':
        # Half-pixel centres; a source position left of the first sample is clamped to it.
        src = np.maximum((out + 0.5) * scale - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        frac = src - lo
        np.add.at(weights, (rows, lo), 1 - frac)
        np.add.at(weights, (rows, np.minimum(lo + 1, n_in - 1)), frac)
        return weights

    if method == 'bicubic':
        # Keys a = -0.75 on the 4 samples around the half-pixel source position; taps outside the
        # grid read the edge sample (index clamping), so the weights always sum to 1.
        src = (out + 0.5) * scale - 0.5
        lo = np.floor(src).astype(int)
        t = src - lo
        for k in range(-1, 3):
            np.add.at(weights, (rows, np.clip(lo + k, 0, n_in - 1)), _keys_cubic(t - k, -0.75))
        return weights

    # bicubic_antialias: Keys a = -0.5 (PIL's), stretched by the scale when downsampling; taps
    # outside the grid are dropped and the rest renormalised (PyTorch's _upsample_bicubic2d_aa).
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    for o in range(n_out):
        center = scale * (o + 0.5)
        # int() truncates toward zero, as the C++ static_cast does.
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _keys_cubic((taps - center + 0.5) * inv, -0.5)
        weights[o, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return weights


def resample_posemb(posemb: np.ndarray, new_shape: tuple[int, ...], num_prefix_tokens: int, *,
                    method: str = 'bilinear_align_corners',
                    old_grid: tuple[int, int] | None = None,
                    new_grid: tuple[int, int] | None = None) -> np.ndarray:
    """Resamples the grid part of a position embedding [1, prefix + h*w, D] to `new_shape`.

    new_shape is the target parameter shape (1, prefix + h'*w', D). The first num_prefix_tokens
    rows (the class token's) are kept; the rest are viewed as an h x w grid (square unless
    old_grid / new_grid say otherwise) and resampled by `method`, one of POSEMB_METHODS:
    'bilinear_align_corners' (default: scipy.ndimage.zoom(order=1), what vision_transformer and
    big_vision do to their .npz), 'bicubic_antialias' (timm's resample_abs_pos_embed as timm loads
    its state dicts), or PyTorch's plain 'bilinear' / 'bicubic' (align_corners=False, no
    antialiasing). Computed in float64, returned in the input dtype.
    """
    posemb = np.asarray(posemb)
    if tuple(posemb.shape) == tuple(new_shape):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    old_grid = old_grid or _square(grid.shape[0], 'checkpoint')
    new_grid = new_grid or _square(new_shape[1] - num_prefix_tokens, 'model')
    grid = grid.reshape(*old_grid, -1).astype(np.float64)
    rows = resize_weights(old_grid[0], new_grid[0], method)
    cols = resize_weights(old_grid[1], new_grid[1], method)
    grid = np.einsum('ih,jw,hwd->ijd', rows, cols, grid)
    grid = grid.astype(posemb.dtype).reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([prefix, grid], axis=1)


def _square(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f'the {what} position embedding has {n} grid tokens, not a square: '
                         'pass old_grid/new_grid')
    return side, side


def resample_to_model(loaded: Tree, init: Mapping[str, Any], method: str,
                      grid: tuple[int, int] | None) -> None:
    """In place: resizes the checkpoint's position embedding to the model's grid if it differs."""
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    if POSEMB_PATH not in flat_loaded or POSEMB_PATH not in flat_init:
        return
    old, new = flat_loaded[POSEMB_PATH], flat_init[POSEMB_PATH]
    prefix = int('cls' in flat_init)
    if (tuple(old.shape) == tuple(new.shape) or prefix != int('cls' in flat_loaded)
            or old.shape[2] != new.shape[2]):
        return  # same grid, or a mismatch that merge_params reports by name
    loaded['Transformer']['posembed_input']['pos_embedding'] = resample_posemb(
        old, tuple(new.shape), prefix, method=method, new_grid=grid)

