"""Importers for pretrained weights: vision_transformer / big_vision `.npz` and timm state dicts.

Everything ends in the parameter tree of `soupjax.models` (vision_transformer names for ViT, see
models/vit.py; the ResNet names are listed in models/resnet.py) and goes through one strict merge,
`merge_params`, which names every missing, extra or misshaped parameter in a single error, so a
wrong file fails loudly instead of fine-tuning from a half-random init.

    variables = model.init(rng, images)            # or jax.eval_shape(model.init, rng, images)
    variables = load_pretrained('ViT-B_16.npz', variables)        # head re-initialised if needed

A ViT must also run the GELU its checkpoint was trained with (tanh for .npz, exact for timm):
`with_checkpoint_activation(config)` sets the config's `model.gelu_approximate` from
`init_from.path`, and refuses a config that asks for the other one.

Our own Orbax checkpoints are read by soupjax.io.checkpoints, not here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from soupjax.cli.errors import InputError
from soupjax.io.trees import Tree, flatten, unflatten

if TYPE_CHECKING:
    from ml_collections import ConfigDict



_TIMM_EXTENSIONS = ('.safetensors', '.pth', '.pt', '.bin')
_POSEMB = 'Transformer/posembed_input/pos_embedding'


class PretrainedMismatchError(ValueError):
    """A checkpoint does not fit the model; `problems` holds one line per offending parameter."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(
            f'checkpoint {source} does not match the model ({len(problems)} problems):\n  '
            + '\n  '.join(problems)
            + "\n(parameters that should keep their init value, such as a new head, go in "
              "dont_load, e.g. dont_load=('head/.*',))")


# ---------------------------------------------------------------------------------------------
# Tree helpers: everything is compared by '/'-joined path.

def _matches(path: str, patterns: Iterable[str]) -> bool:
    # fullmatch, as big_vision: 'head/.*' must not catch 'pre_logits_head/...'.
    return any(re.fullmatch(p, path) for p in patterns)


# ---------------------------------------------------------------------------------------------
# vision_transformer / big_vision .npz

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
        raise InputError(f'{path}: not a readable .npz archive of arrays ({_first_line(e)})') from None
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
                    f'.npz files with allow_pickle=False and did not unpickle it ({_first_line(e)})') from None
    return flat


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's weights_only refusal runs to a dozen lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _torch_refusal(error: BaseException) -> str:
    """The reason in torch's weights_only refusal (e.g. 'Unsupported global: GLOBAL io.open was not an
    allowed global by default'), without the dozen lines of advice around it."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))  # torch puts terminal bold codes in it
    match = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?$)', text, re.MULTILINE)
    return match.group(1).strip() if match else _first_line(ValueError(text))


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
            out[_POSEMB] = posemb
    return out


# ---------------------------------------------------------------------------------------------
# timm state dicts

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
            raise InputError(f'{path}: not a readable safetensors file ({_first_line(e)})') from None
    if path.suffix not in _TIMM_EXTENSIONS:
        raise ValueError(f'{path}: not a timm checkpoint (expected one of {_TIMM_EXTENSIONS})')
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
        raise InputError(f'{path}: not a readable PyTorch checkpoint ({_first_line(e)})') from None
    for wrapper in ('state_dict_ema', 'state_dict', 'model'):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise InputError(f'{path}: holds a {type(obj).__name__}, not a state dict (a mapping of '
                         'parameter names to tensors)')
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
    flat[_POSEMB] = posemb

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


# ---------------------------------------------------------------------------------------------
# The activation a checkpoint was trained with
#
# The GELU of the ViT's MLP is not the same function in every codebase: vision_transformer and
# big_vision call Flax's nn.gelu, whose default is the tanh approximation, timm calls PyTorch's
# nn.GELU(), the exact erf. The two differ by up to 4.7e-4 per activation (near |x| = 2.7); the
# logits of AugReg checkpoints run with the wrong one move by 4e-4 to 7e-4 (as reported when this
# was found), far above float32 rounding. A model initialised from a checkpoint runs
# with the GELU the checkpoint was trained with (models/vit.py `gelu_approximate`), unless the
# config says otherwise on purpose.

# The vocabulary of meta.json's 'activation' for the two GELUs (models.activation writes it).
_GELU_OF_ACTIVATION = {'gelu_exact': False, 'gelu_tanh': True}


@dataclasses.dataclass(frozen=True)
class CheckpointActivation:
    """The GELU of the ViT in a checkpoint: `gelu_approximate` (True: tanh) and how it is known."""

    gelu_approximate: bool
    source: str  # e.g. 'a vision_transformer/big_vision .npz', for messages


def gelu_name(approximate: bool) -> str:
    """'the tanh-approximate GELU' or 'the exact (erf) GELU', for messages."""
    return 'the tanh-approximate GELU' if approximate else 'the exact (erf) GELU'


def checkpoint_activation(path: str | Path) -> CheckpointActivation | None:
    """The GELU that the ViT in `path` was trained with, told by its source; None if unknown.

    A `.npz` (vision_transformer / big_vision, nn.gelu's default): tanh. A timm state dict
    (.safetensors, .pth, .pt, .bin): exact. A soupjax ingredient directory: what its meta.json
    records under 'activation', else its config's model.gelu_approximate, else exact (the only
    GELU soupjax ran before it recorded one). Decided by name and metadata, without reading
    weights, so it is cheap to ask whenever a model is built.
    """
    path = Path(path)
    if path.suffix == '.npz':
        return CheckpointActivation(True, 'a vision_transformer/big_vision .npz')
    if path.suffix in _TIMM_EXTENSIONS:
        return CheckpointActivation(False, f'a timm state dict ({path.suffix})')
    from soupjax import models
    from soupjax.io import checkpoints  # orbax: only for ingredient directories
    if not checkpoints.is_ingredient(path):
        return None  # load_pretrained / merge_params will say what is wrong with it
    meta = checkpoints.load_meta(path)
    what = 'a soupjax ingredient'
    if 'activation' in meta:
        gelu = _GELU_OF_ACTIVATION.get(meta['activation'])  # None: not a ViT ('relu')
        return None if gelu is None else CheckpointActivation(gelu, f"{what} (its meta.json)")
    model = meta.get('config', {}).get('model', {})
    if model.get('gelu_approximate') is not None:
        return CheckpointActivation(bool(model['gelu_approximate']),
                                    f'{what} (its config\'s model.gelu_approximate)')
    try:
        is_vit = 'gelu_approximate' in models.config_keys(model.get('name', ''))
    except ValueError:
        is_vit = False
    if not is_vit:
        return None
    return CheckpointActivation(False, f'{what} (no activation recorded: the default)')


class ActivationMismatchError(ValueError):
    """The config asks for another GELU than the one the init checkpoint was trained with."""


def with_checkpoint_activation(config: ConfigDict) -> ConfigDict:
    """`config` with `model.gelu_approximate` set to the GELU its `init_from.path` was trained with.

    For a ViT initialised from a checkpoint whose GELU is known (`checkpoint_activation`):
      - model.gelu_approximate unset (or None): it becomes the checkpoint's, in a copy;
      - set to the checkpoint's: `config` is returned as it is;
      - set to the other one: ActivationMismatchError, naming the file and both activations,
        unless `init_from.allow_activation_mismatch` is True (then the config's is used).
    Anything else (trained from scratch, a ResNet, an unknown source) is returned unchanged, so
    models trained from scratch keep the model's default, the exact GELU. `config` itself is never
    modified: it is what meta.json stores and what a resumed or repeated run is compared with.
    Idempotent, so it may be applied wherever a model is built from a config.
    """
    from soupjax import models
    path = config.init_from.path
    if not path or 'gelu_approximate' not in models.config_keys(config.model.name):
        return config
    needed = checkpoint_activation(path)
    if needed is None:
        return config
    configured = config.model.get('gelu_approximate')
    if configured is None:
        resolved = copy.deepcopy(config)
        with resolved.unlocked():
            resolved.model.gelu_approximate = needed.gelu_approximate
        return resolved
    if bool(configured) == needed.gelu_approximate:
        return config
    if not config.init_from.get('allow_activation_mismatch', False):
        raise ActivationMismatchError(
            f'{path} is {needed.source}, trained with {gelu_name(needed.gelu_approximate)} '
            f'(gelu_approximate={needed.gelu_approximate}), but the config sets '
            f'model.gelu_approximate={bool(configured)} ({gelu_name(bool(configured))}). With the '
            'other GELU the pretrained model is not the function it was trained as (up to 4.7e-4 '
            'per activation). Set model.gelu_approximate to '
            f'{needed.gelu_approximate} or leave it out to use the checkpoint\'s GELU, or set '
            'init_from.allow_activation_mismatch=True to fine-tune with the other one on purpose.')
    logging.warning('%s was trained with %s; fine-tuning with %s as the config asks '
                    '(init_from.allow_activation_mismatch)', path,
                    gelu_name(needed.gelu_approximate), gelu_name(bool(configured)))
    return config


# ---------------------------------------------------------------------------------------------
# Position embeddings
#
# A checkpoint made for another resolution has another grid of position embeddings, which is
# resampled to the model's. Each source does it its own way, and we do as the source did:
#   vision_transformer and big_vision (.npz): scipy.ndimage.zoom(grid, order=1), i.e. linear
#     interpolation with the corner samples aligned (vit_jax/checkpoint.py load_pretrained,
#     big_vision/models/vit.py resample_posemb);
#   timm state dicts: timm.layers.resample_abs_pos_embed as timm's checkpoint_filter_fn calls it,
#     F.interpolate(mode='bicubic', align_corners=False, antialias=True).
# jax.image.resize has no corner-aligned mode, and its 'cubic' is the antialiased kind (Keys'
# a = -0.5, weights renormalised at the edges: timm's default, but in float32), not PyTorch's
# plain bicubic (a = -0.75, out-of-grid taps clamped to the edge sample). So every variant is
# written out below as an [out, in] weight matrix per axis, applied separably in float64, and
# tests/test_pretrained.py compares each with scipy / PyTorch in float64.

# posemb_method -> what it reproduces.
POSEMB_METHODS: dict[str, str] = {
    'bilinear_align_corners': 'scipy.ndimage.zoom(order=1), as vision_transformer and big_vision',
    'bilinear': "F.interpolate(mode='bilinear', align_corners=False, antialias=False)",
    'bicubic': "F.interpolate(mode='bicubic', align_corners=False, antialias=False)",
    'bicubic_antialias': "F.interpolate(mode='bicubic', align_corners=False, antialias=True), "
                         "as timm's checkpoint_filter_fn",
}
# The default of each source: what its own loader does with its own checkpoints.
_NPZ_POSEMB_METHOD = 'bilinear_align_corners'
_TIMM_POSEMB_METHOD = 'bicubic_antialias'


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
                    method: str = _NPZ_POSEMB_METHOD,
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


# ---------------------------------------------------------------------------------------------
# The strict merge

def _diff(loaded: Mapping[str, Any], init: Mapping[str, Any], dont_load: Iterable[str],
          label: str = '') -> tuple[dict[str, Any], list[str]]:
    """Merges one collection; returns the flat result and the problems (paths shown with label)."""
    dont_load = tuple(dont_load)
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for path, ref in flat_init.items():
        if _matches(path, dont_load):
            if isinstance(ref, jax.ShapeDtypeStruct):
                problems.append(f'{label}{path}: kept from init by dont_load, but the init '
                                'variables are abstract (jax.eval_shape); pass a real init')
            merged[path] = ref
        elif path not in flat_loaded:
            problems.append(f'{label}{path}: missing in checkpoint (model {tuple(ref.shape)})')
        elif tuple(np.shape(flat_loaded[path])) != tuple(ref.shape):
            problems.append(f'{label}{path}: shape mismatch: checkpoint '
                            f'{tuple(np.shape(flat_loaded[path]))} vs model {tuple(ref.shape)}')
        else:
            merged[path] = jnp.asarray(flat_loaded[path], dtype=ref.dtype)
    for path, value in flat_loaded.items():
        if path not in flat_init and not _matches(path, dont_load):
            problems.append(f'{label}{path}: unexpected in checkpoint (checkpoint '
                            f'{tuple(np.shape(value))}, not in the model)')
    return merged, problems


def merge_params(loaded: Mapping[str, Any], init: Mapping[str, Any], *,
                 dont_load: Iterable[str] = (), source: str = '<file>') -> Tree:
    """Takes every parameter of `init` from `loaded`, strictly.

    Trees are compared by '/'-joined paths. A path that fully matches a `dont_load` regex keeps
    its init value (and may be missing from, or extra in, `loaded`). Every other missing, extra
    or misshaped parameter is reported, all together, in one PretrainedMismatchError naming
    `source`. Loaded values are cast to the init dtype. `init` may be abstract
    (jax.ShapeDtypeStruct leaves, from jax.eval_shape) unless a dont_load path keeps a leaf.
    """
    merged, problems = _diff(loaded, init, dont_load)
    if problems:
        raise PretrainedMismatchError(source, problems)
    return unflatten(merged)


def _detect_kind(loaded_keys: Iterable[str]) -> str:
    keys = set(loaded_keys)
    if 'patch_embed.proj.weight' in keys:
        return 'vit'
    if 'layer1.0.conv1.weight' in keys:
        return 'resnet'
    raise ValueError('cannot tell the model family of this timm checkpoint (neither '
                     "'patch_embed.proj.weight' nor 'layer1.0.conv1.weight'); pass model_kind")


def load_pretrained(path: str | Path, init_variables: Mapping[str, Any], *,
                    dont_load: Iterable[str] = ('head/.*',), model_kind: str | None = None,
                    reinit: Iterable[str] = (), posemb_method: str | None = None,
                    posemb_grid: tuple[int, int] | None = None) -> Tree:
    """Loads a pretrained checkpoint into the variables of a soupjax model.

    Args:
      path: a vision_transformer/big_vision `.npz` (ViT), or a timm `.safetensors`, `.pth`,
        `.pt`, `.bin` (ViT or ResNet, told apart by their keys unless model_kind says).
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
        from the model's (a model made for another resolution), one of POSEMB_METHODS. None
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'pretrained checkpoint not found: {path}')
    source = str(path)

    if path.suffix == '.npz':
        if model_kind not in (None, 'vit'):
            raise ValueError(f'{path}: .npz files hold vision_transformer ViTs, not {model_kind}')
        kind, loaded = 'vit', {'params': load_npz(path)}
    elif path.suffix in _TIMM_EXTENSIONS:
        state_dict = load_timm_state_dict(path)
        kind = model_kind or _detect_kind(state_dict)
        if kind == 'vit':
            query = flatten(init_variables['params']).get(
                'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel')
            heads = query.shape[1] if query is not None else None
            loaded = convert_timm_vit(state_dict, num_heads=heads)
        elif kind == 'resnet':
            loaded = convert_timm_resnet(state_dict)
        else:
            raise ValueError(f"model_kind must be 'vit' or 'resnet', got {kind!r}")
    else:
        raise ValueError(f'{path}: unknown checkpoint format {path.suffix!r} '
                         f"(expected .npz or one of {_TIMM_EXTENSIONS})")

    model_is_vit = 'embedding' in init_variables.get('params', {})
    if model_is_vit != (kind == 'vit'):
        raise PretrainedMismatchError(source, [
            f"the checkpoint is a {kind} but the model is {'a ViT' if model_is_vit else 'not'}"])

    if kind == 'vit':
        if posemb_method is None:
            posemb_method = _NPZ_POSEMB_METHOD if path.suffix == '.npz' else _TIMM_POSEMB_METHOD
        _resample_posemb_to_model(loaded['params'], init_variables['params'], posemb_method,
                                  posemb_grid)

    merged, problems = {}, []
    for collection, init_tree in init_variables.items():
        label = '' if collection == 'params' else f'{collection}/'
        loaded_tree = loaded.get(collection, {})
        keep = list(reinit) + _unfit(loaded_tree, init_tree, dont_load)
        merged[collection], found = _diff(loaded_tree, init_tree, keep, label)
        problems += found
    for collection in loaded:
        if collection not in init_variables and flatten(loaded[collection]):
            problems.append(f'{collection}: collection in the checkpoint but not in the model')
    if problems:
        raise PretrainedMismatchError(source, problems)
    return {collection: unflatten(flat) for collection, flat in merged.items()}


def _unfit(loaded: Mapping[str, Any], init: Mapping[str, Any], dont_load: Iterable[str]
           ) -> list[str]:
    """Exact-path regexes for the dont_load parameters that the checkpoint cannot provide."""
    dont_load = tuple(dont_load)
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    unfit = [p for p, ref in flat_init.items() if _matches(p, dont_load)
             and (p not in flat_loaded or tuple(np.shape(flat_loaded[p])) != tuple(ref.shape))]
    unfit += [p for p in flat_loaded if p not in flat_init and _matches(p, dont_load)]
    # A head is one unit: if its kernel does not fit, its bias is not loaded either.
    groups = {p.rsplit('/', 1)[0] for p in unfit}
    unfit += [p for p in flat_init if p.rsplit('/', 1)[0] in groups and _matches(p, dont_load)]
    return [re.escape(p) for p in sorted(set(unfit))]


def _resample_posemb_to_model(loaded: Tree, init: Mapping[str, Any], method: str,
                              grid: tuple[int, int] | None) -> None:
    """In place: resizes the checkpoint's position embedding to the model's grid if it differs."""
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    if _POSEMB not in flat_loaded or _POSEMB not in flat_init:
        return
    old, new = flat_loaded[_POSEMB], flat_init[_POSEMB]
    prefix = int('cls' in flat_init)
    if (tuple(old.shape) == tuple(new.shape) or prefix != int('cls' in flat_loaded)
            or old.shape[2] != new.shape[2]):
        return  # same grid, or a mismatch that merge_params reports by name
    loaded['Transformer']['posembed_input']['pos_embedding'] = resample_posemb(
        old, tuple(new.shape), prefix, method=method, new_grid=grid)


# ---------------------------------------------------------------------------------------------

def fingerprint(variables: Mapping[str, Any]) -> str:
    """A short stable hash of a variables/params tree: names, shapes, dtypes and values.

    sha256 over the leaves in sorted '/'-path order, first 16 hex digits. Two ingredients
    fine-tuned from the same init share the fingerprint of that init; a soup checks it.
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten(variables).items()):
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        digest.update(f'{path}|{array.shape}|{array.dtype.name}|'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
