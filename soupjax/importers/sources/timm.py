"""timm (PyTorch) state dicts of ViTs and ResNets: read safely, converted to soupjax's trees.

.safetensors is read without torch; .pth/.pt/.bin with torch.load(weights_only=True), which unpickles
tensors and plain containers only. timm's ViTs run PyTorch's exact (erf) GELU, and timm resamples
position embeddings with F.interpolate(mode='bicubic', antialias=True) ('bicubic_antialias').
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.cli.errors import InputError
from soupjax.importers.state_dict import unwrap as unwrap_state_dict
from soupjax.importers.posemb import POSEMB_PATH
from soupjax.importers.sources import Source, first_line
from soupjax.io.trees import Tree, flatten, unflatten

SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin')


def load_timm_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a timm/PyTorch state dict from .safetensors, .pth, .pt or .bin into numpy arrays.

    .safetensors needs no torch (safetensors.numpy). The pickle formats are read with
    torch.load(weights_only=True), which refuses arbitrary code; torch is imported only then. A file
    it refuses, or one that is not a checkpoint at all, raises an InputError naming the file.
    Training checkpoints that wrap the weights in 'state_dict' / 'model' / 'state_dict_ema', and
    DistributedDataParallel's 'module.' prefix, are unwrapped.
    """
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise InputError(f'{path}: not a readable safetensors file ({first_line(e)})') from None
    if path.suffix not in SUFFIXES:
        raise ValueError(f'{path}: not a timm checkpoint (expected one of {SUFFIXES})')
    import pickle

    import torch  # a test extra; only needed for the pickle formats

    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True unpickles only tensors and plain containers; anything else (a class,
        # a function such as open or os.system) is refused before it is called.
        raise InputError(
            f'{path}: not a plain tensor state dict: torch.load(weights_only=True) refused to unpickle '
            f'it ({_torch_refusal(e)}). soupjax never runs code from a checkpoint; if you trust the file, '
            'save its state_dict() with torch.save or safetensors and load that') from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
        raise InputError(f'{path}: not a readable PyTorch checkpoint ({first_line(e)})') from None
    obj = unwrap_state_dict(obj, path)
    out = {}
    for key, tensor in obj.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = key[len('module.'):] if key.startswith('module.') else key
        # numpy has no bfloat16: such weights come back as float32.
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        out[key] = tensor.detach().cpu().numpy()
    return out


def _torch_refusal(error: BaseException) -> str:
    """The reason in torch's weights_only refusal (e.g. 'Unsupported global: GLOBAL io.open was not an
    allowed global by default'), without the dozen lines of advice around it."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))  # torch puts terminal bold codes in it
    match = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?$)', text, re.MULTILINE)
    return match.group(1).strip() if match else first_line(ValueError(text))


def _linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return w.T


def _conv(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight OIHW -> Flax HWIO."""
    return w.transpose(2, 3, 1, 0)


def _unconverted(sd: Mapping[str, np.ndarray], used: set[str], what: str) -> None:
    rest = sorted(k for k in sd if k not in used and not k.endswith('num_batches_tracked'))
    if rest:
        raise ValueError(f'{what}: no soupjax equivalent for timm keys {rest}')


# Heads of the standard ViT widths, used when the caller does not say.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}


def convert_timm_vit(state_dict: Mapping[str, np.ndarray], *,
                     num_heads: int | None = None) -> Tree:
    """Converts a timm `vit_*_patch*_*` state dict to {'params': vision_transformer-named tree}.

    The fused qkv Linear [3D, D] is split into query/key/value DenseGeneral kernels [D, heads,
    head_dim]; proj becomes `out` [heads, head_dim, D]. num_heads cannot be read off the weights:
    by default it is the standard one for the width (Ti 3, S 6, B 12, L/H 16); load_pretrained
    takes it from the model. timm models with a class token but no position embedding for it
    (no_embed_class, e.g. DeiT-III) get a zero row, which is the same function. Unsupported
    features (fc_norm after average pooling, LayerScale, register tokens, qk-norm) raise.
    """
    sd = state_dict
    if 'fc_norm.weight' in sd:
        raise ValueError('convert_timm_vit: this timm ViT applies a LayerNorm (fc_norm) after '
                         "average pooling; soupjax's 'gap' pools after the encoder's LayerNorm, "
                         'as vision_transformer, so it cannot hold these weights')
    width = sd['patch_embed.proj.weight'].shape[0]
    heads = num_heads or _HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ValueError(f'timm ViT of width {width}: pass num_heads')
    head_dim = width // heads
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f'convert_timm_vit: timm key {key!r} is missing')
        used.add(key)
        return np.asarray(sd[key])

    flat: dict[str, np.ndarray] = {
        'embedding/kernel': _conv(take('patch_embed.proj.weight')),
        'embedding/bias': take('patch_embed.proj.bias'),
    }
    has_cls = 'cls_token' in sd
    if has_cls:
        flat['cls'] = take('cls_token')
    posemb = take('pos_embed')
    if has_cls and math.isqrt(posemb.shape[1]) ** 2 == posemb.shape[1]:
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    flat[POSEMB_PATH] = posemb

    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    for i in range(depth):
        src, dst = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
        for norm, name in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
            flat[f'{dst}{name}/scale'] = take(f'{src}{norm}.weight')
            flat[f'{dst}{name}/bias'] = take(f'{src}{norm}.bias')
        attn = f'{dst}MultiHeadDotProductAttention_1/'
        qkv_w = _linear(take(f'{src}attn.qkv.weight')).reshape(width, 3, heads, head_dim)
        qkv_b = take(f'{src}attn.qkv.bias').reshape(3, heads, head_dim)
        for j, name in enumerate(('query', 'key', 'value')):
            flat[f'{attn}{name}/kernel'] = qkv_w[:, j]
            flat[f'{attn}{name}/bias'] = qkv_b[j]
        flat[f'{attn}out/kernel'] = _linear(take(f'{src}attn.proj.weight')).reshape(
            heads, head_dim, width)
        flat[f'{attn}out/bias'] = take(f'{src}attn.proj.bias')
        for fc, name in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
            flat[f'{dst}MlpBlock_3/{name}/kernel'] = _linear(take(f'{src}mlp.{fc}.weight'))
            flat[f'{dst}MlpBlock_3/{name}/bias'] = take(f'{src}mlp.{fc}.bias')
    flat['Transformer/encoder_norm/scale'] = take('norm.weight')
    flat['Transformer/encoder_norm/bias'] = take('norm.bias')

    if 'pre_logits.fc.weight' in sd:  # old timm ports of the i21k checkpoints
        flat['pre_logits/kernel'] = _linear(take('pre_logits.fc.weight'))
        flat['pre_logits/bias'] = take('pre_logits.fc.bias')
    if 'head.weight' in sd:  # absent when the timm model was made with num_classes=0
        flat['head/kernel'] = _linear(take('head.weight'))
        flat['head/bias'] = take('head.bias')
    _unconverted(sd, used, 'convert_timm_vit')
    return {'params': unflatten(flat)}


def convert_timm_resnet(state_dict: Mapping[str, np.ndarray]) -> Tree:
    """Converts a timm resnet18/34/50/50d-style state dict to {'params', 'batch_stats'}.

    Names map as listed in models/resnet.py. BatchNorm weight/bias -> params scale/bias,
    running_mean/var -> batch_stats mean/var; num_batches_tracked is dropped. The shortcut's
    Sequential holds (conv, bn) or, with average-pool downsampling, (pool, conv, bn): its members
    are told apart by rank, not by index.
    """
    params: dict[str, np.ndarray] = {}
    stats: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def conv(src: str, dst: str) -> None:
        used.add(f'{src}.weight')
        params[f'{dst}/kernel'] = _conv(np.asarray(state_dict[f'{src}.weight']))

    def bn(src: str, dst: str) -> None:
        for t, (collection, name) in {'weight': (params, 'scale'), 'bias': (params, 'bias'),
                                      'running_mean': (stats, 'mean'),
                                      'running_var': (stats, 'var')}.items():
            used.add(f'{src}.{t}')
            collection[f'{dst}/{name}'] = np.asarray(state_dict[f'{src}.{t}'])

    if 'conv1.0.weight' in state_dict:  # deep stem: conv1 = Sequential(conv, bn, act) x2 + conv
        for i, idx in enumerate((0, 3, 6)):
            conv(f'conv1.{idx}', f'stem_conv_{i}')
        bn('conv1.1', 'stem_bn_0')
        bn('conv1.4', 'stem_bn_1')
        bn('bn1', 'stem_bn_2')
    else:
        conv('conv1', 'stem_conv')
        bn('bn1', 'stem_bn')

    block_re = re.compile(r'layer(\d+)\.(\d+)\.')
    blocks = sorted({m.group(0) for k in state_dict if (m := block_re.match(k))})
    for prefix in blocks:
        stage, block = block_re.match(prefix).groups()
        dst = f'stage{stage}_block{block}/'
        for k in (1, 2, 3):
            if f'{prefix}conv{k}.weight' in state_dict:
                conv(f'{prefix}conv{k}', f'{dst}conv{k}')
                bn(f'{prefix}bn{k}', f'{dst}bn{k}')
        for idx in range(3):
            w = state_dict.get(f'{prefix}downsample.{idx}.weight')
            if w is None:
                continue
            if np.ndim(w) == 4:
                conv(f'{prefix}downsample.{idx}', f'{dst}downsample_conv')
            else:
                bn(f'{prefix}downsample.{idx}', f'{dst}downsample_bn')

    if 'fc.weight' in state_dict:
        used.update(('fc.weight', 'fc.bias'))
        params['head/kernel'] = _linear(np.asarray(state_dict['fc.weight']))
        params['head/bias'] = np.asarray(state_dict['fc.bias'])
    _unconverted(state_dict, used, 'convert_timm_resnet')
    return {'params': unflatten(params), 'batch_stats': unflatten(stats)}



def detect_kind(loaded_keys: Iterable[str]) -> str:
    keys = set(loaded_keys)
    if 'patch_embed.proj.weight' in keys:
        return 'vit'
    if 'layer1.0.conv1.weight' in keys:
        return 'resnet'
    raise ValueError('cannot tell the model family of this timm checkpoint (neither '
                     "'patch_embed.proj.weight' nor 'layer1.0.conv1.weight'); pass model_kind")


def read(path: Path, init_variables: Mapping[str, Any], model_kind: str | None) -> tuple[str, Tree]:
    """The `Source.read` of timm files: a ViT (heads from the model's query kernel) or a ResNet."""
    state_dict = load_timm_state_dict(path)
    kind = model_kind or detect_kind(state_dict)
    if kind == 'vit':
        query = flatten(init_variables['params']).get(
            'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel')
        heads = query.shape[1] if query is not None else None
        return kind, convert_timm_vit(state_dict, num_heads=heads)
    if kind == 'resnet':
        return kind, convert_timm_resnet(state_dict)
    raise ValueError(f"model_kind must be 'vit' or 'resnet', got {kind!r}")


SOURCE = Source(name='a timm state dict', suffixes=SUFFIXES, read=read,
                posemb_method='bicubic_antialias', activation='gelu_exact')
