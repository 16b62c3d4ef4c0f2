"""Exporter: a soupjax ViT (vision_transformer names) -> a timm `VisionTransformer` state dict.

The inverse of `soupjax.importers.sources.timm.convert_timm_vit`. It exists so that an ingredient or a soup
cooked here can be run in PyTorch with timm (to serve it there, or to compare against code written
for PyTorch, as experiments/bench_greedy.py does with the official model-soups greedy loop):

    state = export_timm_vit(checkpoints.load_variables(ingredient_dir))
    save_timm_state_dict(state, 'ingredient.pt')             # or .safetensors
    model = timm.models.vision_transformer.VisionTransformer(**timm_vit_kwargs(variables))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)

Our ViT uses the exact GELU by default (`gelu_approximate=False`), as timm does, so the exported
model gives our logits to float32 rounding. A model built with `gelu_approximate=True` (the
vision_transformer / big_vision numerics) exports too, but timm will run it with the exact GELU.

Only the ViT is supported; any other tree is refused with a ValueError naming the first parameter
path that a ViT must have and the tree lacks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.io.trees import flatten

__all__ = ['export_timm_vit', 'save_timm_state_dict', 'timm_vit_kwargs']

_POSEMB = 'Transformer/posembed_input/pos_embedding'
_BLOCK = re.compile(r'Transformer/encoderblock_(\d+)/')
_ATTN = 'MultiHeadDotProductAttention_1'


def _params(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The flat '/'-named params of `{'params': tree}` (or of a bare params tree), as numpy."""
    if 'params' in variables and isinstance(variables['params'], Mapping):
        others = [c for c, tree in variables.items() if c != 'params' and flatten(tree)]
        if others:
            raise ValueError(f'export_timm_vit: a ViT has only params, but the variables also hold '
                             f'{sorted(others)} (is this a ResNet?)')
        variables = variables['params']
    return {path: np.asarray(leaf) for path, leaf in flatten(variables).items()}


def _depth(flat: Mapping[str, np.ndarray]) -> int:
    indices = {int(m.group(1)) for path in flat if (m := _BLOCK.match(path))}
    if not indices:
        raise ValueError('export_timm_vit: not a soupjax ViT: parameter path '
                         "'Transformer/encoderblock_0/LayerNorm_0/scale' is missing")
    return max(indices) + 1


def _linear(kernel: np.ndarray) -> np.ndarray:
    """Flax Dense kernel [in, out] -> PyTorch Linear weight [out, in]."""
    return np.ascontiguousarray(kernel.T)


def _conv(kernel: np.ndarray) -> np.ndarray:
    """Flax conv kernel HWIO -> PyTorch OIHW."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def export_timm_vit(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts our ViT `{'params': ...}` (or a bare params tree) to a timm state dict of numpy arrays.

    Exactly inverts `convert_timm_vit`: query/key/value kernels [D, heads, head_dim] are fused into
    timm's `attn.qkv` Linear [3D, D] (rows q, then k, then v, each head-major), `out`
    [heads, head_dim, D] becomes `attn.proj` [D, D], Dense kernels are transposed to Linear weights,
    the patch embedding goes HWIO -> OIHW, LayerNorm scale -> weight, and `cls` /
    `pos_embedding` become `cls_token` / `pos_embed` unchanged (timm's default layout, with the class
    token's row in the position embedding). Values and dtypes are kept as stored.

    A 'gap' ViT (no `cls`) maps to timm's `class_token=False, global_pool='avg', fc_norm=False`; a
    `pre_logits` layer to the old `pre_logits.fc` of timm's i21k ports (which current timm models
    cannot hold, but `convert_timm_vit` reads back).

    Raises:
      ValueError: the tree is not a soupjax ViT (names the first missing parameter path), or holds
        parameters timm's ViT has no place for (names them all).
    """
    flat = _params(variables)
    used: set[str] = set()

    def take(path: str) -> np.ndarray:
        if path not in flat:
            raise ValueError(f'export_timm_vit: not a soupjax ViT: parameter path {path!r} is missing')
        used.add(path)
        return flat[path]

    sd: dict[str, np.ndarray] = {}
    # Checked first so that a non-ViT tree is named by its first missing ViT parameter.
    sd['patch_embed.proj.weight'] = _conv(take('embedding/kernel'))
    sd['patch_embed.proj.bias'] = take('embedding/bias')
    if 'cls' in flat:
        sd['cls_token'] = take('cls')
    sd['pos_embed'] = take(_POSEMB)

    for i in range(_depth(flat)):
        src, dst = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        for name, norm in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
            sd[f'{dst}{norm}.weight'] = take(f'{src}{name}/scale')
            sd[f'{dst}{norm}.bias'] = take(f'{src}{name}/bias')
        attn = f'{src}{_ATTN}/'
        q, k, v = (take(f'{attn}{n}/kernel') for n in ('query', 'key', 'value'))
        width = q.shape[0]
        # [D, heads, hd] x3 -> [D, 3, heads, hd] -> [D, 3D] (the reshape convert_timm_vit undoes).
        sd[f'{dst}attn.qkv.weight'] = _linear(np.stack([q, k, v], axis=1).reshape(width, -1))
        sd[f'{dst}attn.qkv.bias'] = np.stack(
            [take(f'{attn}{n}/bias') for n in ('query', 'key', 'value')]).reshape(-1)
        out = take(f'{attn}out/kernel')
        sd[f'{dst}attn.proj.weight'] = _linear(out.reshape(-1, out.shape[-1]))
        sd[f'{dst}attn.proj.bias'] = take(f'{attn}out/bias')
        for name, fc in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
            sd[f'{dst}mlp.{fc}.weight'] = _linear(take(f'{src}MlpBlock_3/{name}/kernel'))
            sd[f'{dst}mlp.{fc}.bias'] = take(f'{src}MlpBlock_3/{name}/bias')
    sd['norm.weight'] = take('Transformer/encoder_norm/scale')
    sd['norm.bias'] = take('Transformer/encoder_norm/bias')

    if 'pre_logits/kernel' in flat:
        sd['pre_logits.fc.weight'] = _linear(take('pre_logits/kernel'))
        sd['pre_logits.fc.bias'] = take('pre_logits/bias')
    if 'head/kernel' in flat:
        sd['head.weight'] = _linear(take('head/kernel'))
        sd['head.bias'] = take('head/bias')

    rest = sorted(set(flat) - used)
    if rest:
        raise ValueError(f'export_timm_vit: no timm ViT equivalent for parameters {rest}')
    return sd


def timm_vit_kwargs(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The `timm.models.vision_transformer.VisionTransformer(**kwargs)` that holds the exported weights.

    Read off the shapes (square images and patches assumed): img_size, patch_size, in_chans,
    embed_dim, depth, num_heads, mlp_ratio, num_classes, and for a 'gap' ViT class_token=False,
    global_pool='avg', fc_norm=False (LayerNorm before pooling, as ours). timm's defaults for the
    rest (LayerNorm eps 1e-6, exact GELU, qkv bias) are those of our ViT.
    """
    flat = _params(variables)
    for path in ('embedding/kernel', _POSEMB,
                 f'Transformer/encoderblock_0/{_ATTN}/query/kernel',
                 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'):
        if path not in flat:
            raise ValueError(f'timm_vit_kwargs: not a soupjax ViT: parameter path {path!r} is missing')
    if 'pre_logits/kernel' in flat:
        raise ValueError('timm_vit_kwargs: current timm ViTs have no pre_logits layer '
                         '(representation_size); the state dict can be exported but not loaded')
    patch, _, in_chans, width = flat['embedding/kernel'].shape
    has_cls = 'cls' in flat
    grid = flat[_POSEMB].shape[1] - int(has_cls)
    side = math.isqrt(grid)
    if side * side != grid:
        raise ValueError(f'timm_vit_kwargs: {grid} patch positions do not form a square grid')
    kwargs: dict[str, Any] = dict(
        img_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=width,
        depth=_depth(flat),
        num_heads=flat[f'Transformer/encoderblock_0/{_ATTN}/query/kernel'].shape[1],
        mlp_ratio=flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape[1] / width,
        num_classes=flat['head/kernel'].shape[1] if 'head/kernel' in flat else 0)
    if not has_cls:
        kwargs.update(class_token=False, global_pool='avg', fc_norm=False)
    return kwargs


def save_timm_state_dict(state: Mapping[str, Any], path: str | Path) -> Path:
    """Writes a state dict (from `export_timm_vit`, or variables, which are exported first).

    `.safetensors` is written with safetensors.numpy (no torch needed); `.pt`, `.pth` and `.bin`
    with `torch.save` of contiguous CPU tensors, which `torch.load(weights_only=True)` and
    `soupjax.importers.sources.timm.load_timm_state_dict` read back.
    """
    path = Path(path)
    if any(isinstance(v, Mapping) for v in state.values()):  # variables, not a state dict
        state = export_timm_vit(state)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == '.safetensors':
        from safetensors.numpy import save_file
        save_file(arrays, str(path))
    elif path.suffix in ('.pt', '.pth', '.bin'):
        import torch  # a test extra; only needed for the pickle formats
        torch.save({k: _tensor(torch, v) for k, v in arrays.items()}, path)
    else:
        raise ValueError(f'{path}: unknown format {path.suffix!r} '
                         "(expected '.safetensors', '.pt', '.pth' or '.bin')")
    return path


def _tensor(torch: Any, array: np.ndarray) -> Any:
    # torch.from_numpy does not know ml_dtypes' bfloat16: go through float32 (exact).
    if array.dtype.name == 'bfloat16':
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(array)
