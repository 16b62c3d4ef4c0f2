"""Where each tensor of soupjax's CLIP (models/clip.py) lives in the two layouts CLIP files come in, and
the sizes a file's tensor shapes imply.

'open_clip': OpenAI's and open_clip's state dicts (and OpenAI's TorchScript archives, whose attributes
  carry the same names): `visual.conv1.weight`, `visual.transformer.resblocks.{i}.attn.in_proj_weight`,
  `token_embedding.weight`, `text_projection`, ...
'transformers': Hugging Face's CLIPModel: `vision_model.embeddings.patch_embedding.weight`,
  `vision_model.encoder.layers.{i}.self_attn.q_proj.weight`, `visual_projection.weight`, ...

`vision_entries` / `text_entries` list, for given sizes, every tensor of soupjax's tree with the file's
name for it, the shape the file must hold and how it is converted; reading and the checks against a
model both go through them, so a missing or misshaped tensor is named the same way by each.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from soupjax.cli.errors import InputError

Convert = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class VisionSize:
    """The image tower's shape (image_size is patch_size x the side of the position grid)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    embed_dim: int


@dataclasses.dataclass(frozen=True)
class TextSize:
    """The text tower's shape."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    embed_dim: int


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of soupjax's tree: its '/'-joined path, the file's name and shape for it, the conversion."""

    path: str
    key: str
    shape: tuple[int, ...]
    convert: Convert


@dataclasses.dataclass(frozen=True)
class Layout:
    """The names one codebase gives CLIP's tensors."""

    name: str
    vision_prefix: str
    text_block: str  # a key present only when the text tower's blocks are
    patch_key: str
    vision_pos_key: str
    vision_proj_key: str
    vision_block: str  # the prefix of block i, with '{i}'
    text_block_prefix: str
    token_key: str
    text_pos_key: str
    text_norm: str
    text_proj_key: str


OPEN_CLIP = Layout(
    name='open_clip', vision_prefix='visual.', text_block='transformer.resblocks.0.ln_1.weight',
    patch_key='visual.conv1.weight', vision_pos_key='visual.positional_embedding',
    vision_proj_key='visual.proj', vision_block='visual.transformer.resblocks.{i}.',
    text_block_prefix='transformer.resblocks.{i}.', token_key='token_embedding.weight',
    text_pos_key='positional_embedding', text_norm='ln_final', text_proj_key='text_projection')
TRANSFORMERS = Layout(
    name='transformers', vision_prefix='vision_model.',
    text_block='text_model.encoder.layers.0.layer_norm1.weight',
    patch_key='vision_model.embeddings.patch_embedding.weight',
    vision_pos_key='vision_model.embeddings.position_embedding.weight',
    vision_proj_key='visual_projection.weight', vision_block='vision_model.encoder.layers.{i}.',
    text_block_prefix='text_model.encoder.layers.{i}.',
    token_key='text_model.embeddings.token_embedding.weight',
    text_pos_key='text_model.embeddings.position_embedding.weight',
    text_norm='text_model.final_layer_norm', text_proj_key='text_projection.weight')
LAYOUTS = (OPEN_CLIP, TRANSFORMERS)

# Tensors a CLIP file may hold that soupjax's towers have no use for: the contrastive logit scale (kept
# aside by the reader), SigLIP's logit bias and the scalars of OpenAI's TorchScript archives, at the top;
# anywhere, the causal mask and transformers' position ids (buffers, which a TorchScript archive keeps
# wherever its modules had them). A block's own `attn.logit_scale` (open_clip's scaled cosine attention)
# is not one of them: it changes the function, so it is refused as unknown.
IGNORED_KEYS = frozenset({'logit_scale', 'logit_bias', 'input_resolution', 'context_length', 'vocab_size'})
IGNORED_BUFFERS = frozenset({'attn_mask', 'position_ids'})


def is_ignored(key: str) -> bool:
    """Whether a file's tensor is one soupjax's CLIP has no use for (IGNORED_KEYS, IGNORED_BUFFERS)."""
    return key in IGNORED_KEYS or key.rsplit('.', 1)[-1] in IGNORED_BUFFERS


def layout_of(keys: set[str]) -> Layout | None:
    """The layout whose image tower the keys hold (by their prefix); None for neither."""
    for layout in LAYOUTS:
        if any(k.startswith(layout.vision_prefix) for k in keys):
            return layout
    return None


def _ident(w: np.ndarray) -> np.ndarray:
    return w


def _linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> Flax kernel [in, out]."""
    return w.T


def _conv(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight OIHW -> Flax HWIO."""
    return w.transpose(2, 3, 1, 0)


def _block_entries(layout: Layout, src: str, dst: str, width: int, heads: int,
                   mlp_dim: int) -> list[Entry]:
    """The tensors of one residual block (attention per head, as soupjax.models.vit.SelfAttention)."""
    if heads <= 0 or width % heads:
        raise InputError(f'a width of {width} does not split into {heads} attention heads')
    hd = width // heads

    def qkv(j: int, fused: bool) -> tuple[Convert, Convert]:
        if fused:  # in_proj_weight [3W, W]: query, key, value rows in turn
            return (lambda w: w[j * width:(j + 1) * width].T.reshape(width, heads, hd),
                    lambda b: b[j * width:(j + 1) * width].reshape(heads, hd))
        return (lambda w: w.T.reshape(width, heads, hd), lambda b: b.reshape(heads, hd))

    if layout is OPEN_CLIP:
        norms, mlp = (('ln_1', 'ln_1'), ('ln_2', 'ln_2')), (('c_fc', 'mlp.c_fc'), ('c_proj', 'mlp.c_proj'))
        attn = [(name, f'{src}attn.in_proj_weight', f'{src}attn.in_proj_bias', (3 * width, width),
                 (3 * width,), qkv(j, True)) for j, name in enumerate(('query', 'key', 'value'))]
        out = f'{src}attn.out_proj.'
    else:
        norms = (('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2'))
        mlp = (('c_fc', 'mlp.fc1'), ('c_proj', 'mlp.fc2'))
        attn = [(name, f'{src}self_attn.{short}_proj.weight', f'{src}self_attn.{short}_proj.bias',
                 (width, width), (width,), qkv(0, False))
                for name, short in (('query', 'q'), ('key', 'k'), ('value', 'v'))]
        out = f'{src}self_attn.out_proj.'
    entries = []
    for ours, theirs in norms:
        entries += norm_entries(f'{dst}{ours}', f'{src}{theirs}', width)
    for name, w_key, b_key, w_shape, b_shape, (conv_w, conv_b) in attn:
        entries.append(Entry(f'{dst}attn/{name}/kernel', w_key, w_shape, conv_w))
        entries.append(Entry(f'{dst}attn/{name}/bias', b_key, b_shape, conv_b))
    entries.append(Entry(f'{dst}attn/out/kernel', f'{out}weight', (width, width),
                         lambda w: w.T.reshape(heads, hd, width)))
    entries.append(Entry(f'{dst}attn/out/bias', f'{out}bias', (width,), _ident))
    for (ours, theirs), (n_out, n_in) in zip(mlp, ((mlp_dim, width), (width, mlp_dim))):
        entries.append(Entry(f'{dst}mlp/{ours}/kernel', f'{src}{theirs}.weight', (n_out, n_in), _linear))
        entries.append(Entry(f'{dst}mlp/{ours}/bias', f'{src}{theirs}.bias', (n_out,), _ident))
    return entries


def norm_entries(dst: str, src: str, width: int) -> list[Entry]:
    """A LayerNorm: weight -> scale, bias -> bias."""
    return [Entry(f'{dst}/scale', f'{src}.weight', (width,), _ident),
            Entry(f'{dst}/bias', f'{src}.bias', (width,), _ident)]


def vision_entries(layout: Layout, size: VisionSize) -> list[Entry]:
    """Every tensor of CLIPImageEncoder's tree, in the order a reader meets them."""
    w, p = size.width, size.patch_size
    grid = (size.image_size // p) ** 2
    v = layout.vision_prefix
    if layout is OPEN_CLIP:
        cls_key, pre, post = f'{v}class_embedding', f'{v}ln_pre', f'{v}ln_post'
        proj = Entry('proj', layout.vision_proj_key, (w, size.embed_dim), _ident)
    else:
        cls_key, pre, post = f'{v}embeddings.class_embedding', f'{v}pre_layrnorm', f'{v}post_layernorm'
        proj = Entry('proj', layout.vision_proj_key, (size.embed_dim, w), _linear)
    entries = [Entry('conv1/kernel', layout.patch_key, (w, 3, p, p), _conv),
               Entry('class_embedding', cls_key, (w,), _ident),
               Entry('positional_embedding', layout.vision_pos_key, (grid + 1, w), _ident),
               *norm_entries('ln_pre', pre, w)]
    for i in range(size.layers):
        entries += _block_entries(layout, layout.vision_block.format(i=i),
                                  f'transformer/resblocks_{i}/', w, size.heads, size.mlp_dim)
    return entries + [*norm_entries('ln_post', post, w), proj]


def text_entries(layout: Layout, size: TextSize) -> list[Entry]:
    """Every tensor of CLIPTextEncoder's tree."""
    t = size.width
    proj = (Entry('text_projection', layout.text_proj_key, (t, size.embed_dim), _ident)
            if layout is OPEN_CLIP else
            Entry('text_projection', layout.text_proj_key, (size.embed_dim, t), _linear))
    entries = [Entry('token_embedding/embedding', layout.token_key, (size.vocab_size, t), _ident),
               Entry('positional_embedding', layout.text_pos_key, (size.context_length, t), _ident)]
    for i in range(size.layers):
        entries += _block_entries(layout, layout.text_block_prefix.format(i=i),
                                  f'transformer/resblocks_{i}/', t, size.heads, size.mlp_dim)
    return entries + [*norm_entries('ln_final', layout.text_norm, t), proj]


def _count_blocks(keys: set[str], template: str) -> int:
    pattern = re.compile(re.escape(template).replace(re.escape('{i}'), r'(\d+)'))
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return 1 + max(found) if found else 0


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, rank: int, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise InputError(f'tensor {key} is missing ({what})')
    if len(shapes[key]) != rank:
        raise InputError(f'tensor {key} has shape {tuple(shapes[key])}, not of rank {rank} ({what})')
    return tuple(shapes[key])


def infer_vision(layout: Layout, shapes: Mapping[str, tuple[int, ...]], heads: int | None) -> VisionSize:
    """The image tower's size from the file's tensor shapes; heads None is OpenAI's rule, width / 64."""
    width, _, patch, _ = _shape(shapes, layout.patch_key, 4, 'the patch embedding, [width, 3, p, p]')
    rows, _ = _shape(shapes, layout.vision_pos_key, 2, 'the position embedding, [1 + grid, width]')
    side = math.isqrt(max(rows - 1, 0))
    if side * side != rows - 1:
        raise InputError(f'tensor {layout.vision_pos_key} has {rows} rows, not 1 + a square grid')
    proj = _shape(shapes, layout.vision_proj_key, 2, 'the image projection')
    embed_dim = proj[1] if layout is OPEN_CLIP else proj[0]
    layers = _count_blocks(set(shapes), layout.vision_block)
    fc = layout.vision_block.format(i=0) + ('mlp.c_fc.weight' if layout is OPEN_CLIP else 'mlp.fc1.weight')
    mlp_dim = _shape(shapes, fc, 2, 'the first block\'s MLP')[0] if layers else 4 * width
    return VisionSize(image_size=side * patch, patch_size=patch, width=width, layers=layers,
                      heads=heads or _heads_by_width(width, layout.patch_key), mlp_dim=mlp_dim,
                      embed_dim=embed_dim)


def infer_text(layout: Layout, shapes: Mapping[str, tuple[int, ...]], heads: int | None) -> TextSize:
    """The text tower's size from the file's tensor shapes; heads None is OpenAI's rule, width / 64."""
    vocab, width = _shape(shapes, layout.token_key, 2, 'the token embedding, [vocab, width]')
    context, _ = _shape(shapes, layout.text_pos_key, 2, 'the position embedding, [context, width]')
    proj = _shape(shapes, layout.text_proj_key, 2, 'the text projection')
    layers = _count_blocks(set(shapes), layout.text_block_prefix)
    fc = layout.text_block_prefix.format(i=0) + (
        'mlp.c_fc.weight' if layout is OPEN_CLIP else 'mlp.fc1.weight')
    mlp_dim = _shape(shapes, fc, 2, 'the first block\'s MLP')[0] if layers else 4 * width
    return TextSize(context_length=context, vocab_size=vocab, width=width, layers=layers,
                    heads=heads or _heads_by_width(width, layout.token_key),
                    mlp_dim=mlp_dim, embed_dim=proj[1] if layout is OPEN_CLIP else proj[0])


def _heads_by_width(width: int, key: str) -> int:
    # OpenAI's CLIP and open_clip's configs use 64-wide heads (open_clip's CLIPVisionCfg.head_width).
    if width % 64:
        raise InputError(f'the tower of {key} is {width} wide, not a multiple of 64: its number of '
                         'attention heads cannot be told from the file; pass it (vision_heads / text_heads)')
    return width // 64
