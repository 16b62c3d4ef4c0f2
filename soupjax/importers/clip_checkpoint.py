"""CLIP checkpoints, the ways users have them, read into soupjax's CLIP trees (models/clip.py).

    ckpt = read_clip('ViT-B-32.pt')                     # or an open_clip .bin/.safetensors, a HF directory
    features = ckpt.image_encoder().apply({'params': ckpt.image_params}, images)

Files read (nothing in any of them runs):
  - open_clip / OpenAI state dicts: `.pt`, `.pth`, `.bin` (torch.save's zips) and `.safetensors`, read
    without torch by importers.clip_torch_archive (the pickle's or the header's tensor records), one
    tensor at a time as it is converted, so a read holds the converted tree and one source tensor, never
    the whole file; a pickle that needs more than tensors (or torch's pre-1.6 format) goes through
    torch.load(weights_only=True). A model-soups `ModelWrapper` state dict (keys `model.` + CLIP's, its
    text blocks deleted, and `classification_head.weight/bias`) reads as the image tower and its head;
    with text=False the text tower's tensors are never read.
  - OpenAI's original TorchScript archives (`ViT-B-32.pt`): their tensors are read from the zip by
    importers.clip_torch_archive, which builds tensors and stub objects only (never torch.jit.load).
  - Hugging Face transformers CLIPModel directories (config.json + model.safetensors, its shards, or
    pytorch_model.bin), as `save_pretrained` writes them; or one of those weight files itself.
Sizes (width, patch, grid, layers, MLP width, embedding width, vocabulary, context) come from the tensor
shapes, so any CLIP ViT loads; a tensor missing or of another shape than its siblings imply is one
InputError naming it and both shapes.

The activation follows the file, by the first rule that applies:
  1. A HF directory (or a weight file with config.json beside it): its vision_config.hidden_act
     ('quick_gelu' -> quick_gelu, 'gelu' -> gelu_exact, 'gelu_new'/'gelu_pytorch_tanh' -> gelu_tanh;
     transformers' default, quick_gelu, when absent).
  2. A TorchScript archive: the class of its MLP activation modules (QuickGELU, or GELU with its
     `approximate`); QuickGELU, OpenAI's, when the archive has none.
  3. A state dict with open_clip's `open_clip_config.json` beside it: its model_cfg.quick_gelu
     (absent: False, open_clip's default, i.e. the exact GELU).
  4. A bare state dict says nothing: the caller's `activation`; without one, QuickGELU (the activation
     of OpenAI's weights, and what open_clip assumes for an OpenAI-layout state dict), with a warning
     telling users of open_clip's LAION models without '-quickgelu' to pass activation='gelu_exact'.
When the file says (1-3) and the caller asks for another, the read is refused unless
allow_activation_mismatch=True (then the caller's, with a warning), as soupjax does for ViT GELUs.

Attention heads cannot be read off the weights: a HF config and a scripted archive state them; otherwise
they follow OpenAI's 64-wide heads (open_clip_config.json's head_width / text heads when present), and
`vision_heads` / `text_heads` override. Loading into a model takes the model's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from soupjax.cli.errors import InputError
from soupjax.importers import clip_layouts as layouts
from soupjax.importers.clip_layouts import TextSize, VisionSize
from soupjax.importers.clip_torch_archive import TorchArchive, safetensors_tensors, state_dict_tensors
from soupjax.importers.posemb import resample_posemb
from soupjax.io.trees import Tree, flatten, unflatten
from soupjax.models import clip as clip_models

STATE_DICT_SUFFIXES = ('.pt', '.pth', '.bin', '.safetensors')
HF_WEIGHTS = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
# transformers' hidden_act -> soupjax's activation name.
HF_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu_exact', 'gelu_new': 'gelu_tanh',
                  'gelu_pytorch_tanh': 'gelu_tanh'}


@dataclasses.dataclass(frozen=True)
class StatedActivation:
    """What a file says about its activation, and where it says it (for messages)."""

    name: str
    source: str


@dataclasses.dataclass
class ClipCheckpoint:
    """A CLIP checkpoint read into soupjax's trees.

    image_params / text_params are the params of models.clip.CLIPImageEncoder / CLIPTextEncoder
    (text None when the file has no text blocks, as model-soups' fine-tuned files, or when read with
    text=False; image_params None when read with image=False); head is a
    model-soups ModelWrapper's classification head as CLIPClassifier's {'kernel', 'bias'}, else None.
    """

    path: Path
    format: str  # 'open_clip state dict', 'TorchScript archive', 'transformers CLIPModel directory', ...
    activation: str  # one of models.clip.CLIP_ACTIVATIONS
    activation_source: str  # how it is known, for messages and provenance
    vision: VisionSize
    image_params: Tree | None
    text: TextSize | None
    text_params: Tree | None
    logit_scale: float | None  # log of the contrastive scale (CLIP's exp(logit_scale) = 100)
    head: Tree | None
    eos_token_id: int | None  # where the text tower pools: None is argmax (open_clip / OpenAI)
    vision_heads_stated: bool  # whether the file states the image tower's heads (else inferred)

    def image_encoder(self, dtype: Any = jnp.float32) -> clip_models.CLIPImageEncoder:
        """The image tower these params fit."""
        v = self.vision
        return clip_models.CLIPImageEncoder(
            patch_size=v.patch_size, width=v.width, layers=v.layers, heads=v.heads, mlp_dim=v.mlp_dim,
            embed_dim=v.embed_dim, activation=self.activation, dtype=dtype)

    def text_encoder(self, dtype: Any = jnp.float32) -> clip_models.CLIPTextEncoder:
        """The text tower these params fit; InputError when the file has none."""
        t = self.text
        if t is None:
            raise InputError(f'{self.path}: has no text tower (its text blocks are not in the file)')
        return clip_models.CLIPTextEncoder(
            context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, layers=t.layers,
            heads=t.heads, mlp_dim=t.mlp_dim, embed_dim=t.embed_dim, activation=self.activation,
            eos_token_id=self.eos_token_id, dtype=dtype)

    def classifier(self, num_classes: int, **overrides: Any) -> clip_models.CLIPClassifier:
        """A CLIPClassifier with this image tower and ``num_classes`` outputs."""
        v = self.vision
        fields = dict(patch_size=v.patch_size, width=v.width, layers=v.layers, heads=v.heads,
                      mlp_dim=v.mlp_dim, embed_dim=v.embed_dim, activation=self.activation)
        return clip_models.CLIPClassifier(num_classes=num_classes, **{**fields, **overrides})


def read_clip(path: str | Path, *, activation: str | None = None, allow_activation_mismatch: bool = False,
              vision_heads: int | None = None, text_heads: int | None = None,
              text: bool = True, image: bool = True) -> ClipCheckpoint:
    """Reads a CLIP checkpoint (any layout of the module docstring) into soupjax's trees.

    Args:
      path: a state dict file, an OpenAI TorchScript archive, or a transformers CLIPModel directory.
      activation: the activation to run (one of models.clip.CLIP_ACTIVATIONS): None takes the file's
        (the rule of the module docstring); one that contradicts what the file says is refused.
      allow_activation_mismatch: run `activation` even where the file says another.
      vision_heads, text_heads: the towers' attention heads, where the file does not state them (a
        file that states others is refused).
      text: False leaves the text tower unread (text None), e.g. to load an image tower alone.
      image: False leaves the image tower's tensors unread (image_params None; its size and every
        check as when read), e.g. to build a zero-shot head from the text tower alone.

    Raises:
      FileNotFoundError: nothing at path.
      InputError: not a CLIP file, unreadable, a tensor missing or misshaped (named, with both shapes),
        an activation mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'CLIP checkpoint not found: {path}')
    if activation is not None:
        clip_models.check_activation(activation)
    fmt, tensors, stated = _read_file(path)
    tensors, head = _unwrap(tensors, path)
    layout = layouts.layout_of(set(tensors))
    if layout is None:
        raise InputError(f'{path}: not a CLIP checkpoint: no tensor under visual. (open_clip, OpenAI) '
                         'or vision_model. (transformers)')
    if any(k.startswith(('visual.attnpool.', 'visual.layer1.')) for k in tensors):
        raise InputError(f'{path}: a ResNet CLIP (visual.attnpool); soupjax reads CLIP ViTs only')
    act = _resolve_activation(path, stated.get('activation'), activation, allow_activation_mismatch)
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    try:
        vision = layouts.infer_vision(layout, shapes, _heads(path, 'vision', stated, vision_heads))
        has_text = text and layout.text_block in tensors
        text_size = (layouts.infer_text(layout, shapes, _heads(path, 'text', stated, text_heads))
                     if has_text else None)
        used = {k for k in tensors if layouts.is_ignored(k)}
        image_params = _convert(tensors, layouts.vision_entries(layout, vision), used, read=image)
        text_params = (_convert(tensors, layouts.text_entries(layout, text_size), used)
                       if text_size else None)
    except InputError as e:
        raise InputError(f'{path}: {e}') from None
    # Keys of a tower that soupjax's CLIP has no place for would silently change the function
    # (LayerScale, attentional pooling, ...): refuse them. Without text blocks, the text leftovers
    # (model-soups files keep its embeddings) are not read.
    leftover = sorted(k for k in tensors if k not in used
                      and (has_text or k.startswith(layout.vision_prefix) or k == layout.vision_proj_key))
    if leftover:
        raise InputError(f'{path}: tensor {leftover[0]} {shapes[leftover[0]]} has no place in soupjax\'s '
                         f'CLIP ViT ({len(leftover)} such tensors; an open_clip variant it does not support)')
    scale = tensors.get('logit_scale')
    return ClipCheckpoint(
        path=path, format=fmt if head is None else f'model-soups ModelWrapper ({fmt})',
        activation=act.name, activation_source=act.source, vision=vision,
        image_params=unflatten(image_params) if image else None, text=text_size,
        text_params=unflatten(text_params) if text_params is not None else None,
        logit_scale=None if scale is None else float(_numpy(scale).reshape(-1)[0]),
        head=head, eos_token_id=stated.get('eos_token_id'),
        vision_heads_stated='vision_heads' in stated)


def _convert(tensors: Mapping[str, Any], entries: list[layouts.Entry], used: set[str],
             read: bool = True) -> dict[str, np.ndarray]:
    """The entries' tensors read one at a time (a lazy tensor's bytes are dropped once converted; the
    last one is kept for the next entry, as query, key and value come from one fused tensor) and
    converted to float32 numpy arrays of their own, in soupjax's layout. ``read=False`` checks their
    names and shapes alone (nothing read, an empty dict)."""
    flat = {}
    last_key, last = None, None
    for entry in entries:
        if entry.key not in tensors:
            raise InputError(f'tensor {entry.key} is missing (expected shape {entry.shape})')
        shape = tuple(np.shape(tensors[entry.key]))
        if shape != entry.shape:
            raise InputError(f'tensor {entry.key} has shape {shape}, but its siblings imply {entry.shape}')
        used.add(entry.key)
        if not read:
            continue
        if entry.key != last_key:
            last_key, last = None, None  # the previous source tensor goes before the next is read
            last_key, last = entry.key, _numpy(tensors[entry.key])
        flat[entry.path] = np.array(entry.convert(last), dtype=np.float32, order='C')
    return flat


def _numpy(value: Any) -> np.ndarray:
    array = value.numpy() if hasattr(value, 'numpy') and not isinstance(value, np.ndarray) else value
    return np.asarray(array)


def _unwrap(tensors: dict[str, Any], path: Path) -> tuple[dict[str, Any], Tree | None]:
    """Strips the `model.` of a model-soups ModelWrapper and takes its classification head aside."""
    head = None
    if 'classification_head.weight' in tensors:
        weight = _numpy(tensors.pop('classification_head.weight'))
        bias = tensors.pop('classification_head.bias', None)
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else _numpy(bias)
        head = {'kernel': np.array(weight.T, np.float32, order='C'), 'bias': np.array(bias, np.float32)}
    if any(k.startswith('model.visual.') for k in tensors):
        tensors = {k.removeprefix('model.'): v for k, v in tensors.items()}
    return tensors, head


def _heads(path: Path, tower: str, stated: Mapping[str, Any], requested: int | None) -> int | None:
    said = stated.get(f'{tower}_heads')
    if requested is not None and said is not None and requested != said:
        raise InputError(f'{path}: the file\'s {tower} tower has {said} attention heads '
                         f'({stated.get("heads_source", "stated in it")}), not {requested}')
    return requested or said


def _resolve_activation(path: Path, stated: StatedActivation | None, requested: str | None,
                        allow_mismatch: bool) -> StatedActivation:
    """The rule of the module docstring."""
    if stated is not None and requested is not None and requested != stated.name:
        if not allow_mismatch:
            raise InputError(
                f'{path} says its activation is {stated.name} ({stated.source}), but {requested} was '
                'asked for; with another activation the pretrained model is not the function it was '
                'trained as: leave the activation unset to use the file\'s, or allow the mismatch '
                '(allow_activation_mismatch=True) to fine-tune with the other one on purpose')
        logging.warning('%s was trained with %s (%s); running %s as asked', path, stated.name,
                        stated.source, requested)
        return StatedActivation(requested, f'asked for, against the file\'s {stated.name}')
    if stated is not None:
        return stated
    if requested is not None:
        return StatedActivation(requested, 'asked for (the file does not say)')
    logging.warning("%s does not say its activation: running QuickGELU, OpenAI's; for open_clip's "
                    "models without '-quickgelu' (LAION's) pass activation='gelu_exact'", path)
    return StatedActivation('quick_gelu', "assumed: OpenAI's QuickGELU (a state dict does not say)")


def _read_file(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(format name, tensors by the file's names, what the file states: activation, heads, eos)."""
    if path.is_dir():
        config = path / 'config.json'
        weights = next((path / name for name in HF_WEIGHTS if (path / name).is_file()), None)
        if not config.is_file() or weights is None:
            raise InputError(f'{path}: a directory, but not a transformers CLIPModel (config.json and '
                             f'one of {", ".join(HF_WEIGHTS)} expected)')
        return 'transformers CLIPModel directory', _read_weights(weights), _hf_config(config)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise InputError(f'{path}: not a CLIP checkpoint file (expected one of {STATE_DICT_SUFFIXES}, '
                         'or a transformers CLIPModel directory)')
    stated: dict[str, Any] = {}
    if (path.parent / 'config.json').is_file() and path.name in HF_WEIGHTS:
        stated = _hf_config(path.parent / 'config.json')
    elif (path.parent / 'open_clip_config.json').is_file():
        stated = _open_clip_config(path.parent / 'open_clip_config.json')
    if path.suffix != '.safetensors' and _is_torchscript(path):
        archive = TorchArchive(path)
        return 'TorchScript archive', archive.tensors(), _archive_statements(archive)
    fmt = 'transformers CLIPModel weights' if path.name in HF_WEIGHTS else 'open_clip state dict'
    return fmt, _read_weights(path), stated


def _read_weights(path: Path) -> dict[str, Any]:
    """A state dict file's (or a sharded safetensors index's) tensors by name, unread: each is read when
    converted, so that a reader holds one of them at a time. A pickle file that is not a zip (torch's
    format before 1.6), or whose pickle needs more than tensors and containers, goes through
    torch.load(weights_only=True) whole, which reads what it can and names what it refuses."""
    if path.name.endswith('.index.json'):  # sharded safetensors: {'weight_map': {key: shard}}
        try:
            shards = sorted(set(json.loads(path.read_text())['weight_map'].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f'{path}: not a safetensors index ({e})') from None
        tensors: dict[str, Any] = {}
        for shard in shards:
            tensors.update(_read_weights(path.parent / shard))
        return tensors
    if path.suffix == '.safetensors':
        return dict(safetensors_tensors(path))
    if zipfile.is_zipfile(path):
        try:
            return dict(state_dict_tensors(path))
        except InputError:
            pass  # torch.load says why, or reads what this reader does not
    from soupjax.importers.sources.timm import load_timm_state_dict  # torch.load(weights_only=True)
    return load_timm_state_dict(path)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == 'constants.pkl' or n.endswith('/constants.pkl') for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _hf_config(path: Path) -> dict[str, Any]:
    """What a transformers config.json states: activation, heads, the end-of-text token."""
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise InputError(f'{path}: not a readable config.json ({e})') from None
    vision = config.get('vision_config') or config.get('vision_config_dict') or {}
    text = config.get('text_config') or config.get('text_config_dict') or {}
    hidden_act = vision.get('hidden_act', 'quick_gelu')  # transformers' CLIPVisionConfig default
    if hidden_act not in HF_ACTIVATIONS:
        raise InputError(f'{path}: vision_config.hidden_act {hidden_act!r} is not one soupjax\'s CLIP '
                         f'runs ({", ".join(HF_ACTIVATIONS)})')
    if text.get('hidden_act', 'quick_gelu') != hidden_act:
        raise InputError(f'{path}: text_config.hidden_act {text.get("hidden_act", "quick_gelu")!r} is not '
                         f'the vision tower\'s {hidden_act!r}; soupjax\'s CLIP runs one activation')
    for name, tower in (('vision_config', vision), ('text_config', text)):
        if tower.get('layer_norm_eps', 1e-5) != 1e-5:
            raise InputError(f'{path}: {name}.layer_norm_eps is {tower["layer_norm_eps"]}; soupjax\'s CLIP '
                             'uses 1e-5 as every CLIP does')
    stated: dict[str, Any] = {
        'activation': StatedActivation(HF_ACTIVATIONS[hidden_act],
                                       f'{path.name} vision_config.hidden_act={hidden_act!r}'),
        'heads_source': path.name}
    if 'num_attention_heads' in vision:
        stated['vision_heads'] = int(vision['num_attention_heads'])
    if 'num_attention_heads' in text:
        stated['text_heads'] = int(text['num_attention_heads'])
    eos = text.get('eos_token_id', 49407)
    # transformers reads argmax(ids) for configs from before its eos fix (eos_token_id 2).
    if isinstance(eos, int) and eos != 2:
        stated['eos_token_id'] = eos
    return stated


def _open_clip_config(path: Path) -> dict[str, Any]:
    """What open_clip's open_clip_config.json states: quick_gelu (default False), the heads."""
    try:
        model_cfg = json.loads(path.read_text()).get('model_cfg', {})
    except (ValueError, OSError, AttributeError) as e:
        raise InputError(f'{path}: not a readable open_clip_config.json ({e})') from None
    quick = bool(model_cfg.get('quick_gelu', False))
    stated: dict[str, Any] = {
        'activation': StatedActivation('quick_gelu' if quick else 'gelu_exact',
                                       f'{path.name} model_cfg.quick_gelu={quick}'),
        'heads_source': path.name}
    vision, text = model_cfg.get('vision_cfg', {}), model_cfg.get('text_cfg', {})
    if 'width' in vision:
        stated['vision_heads'] = int(vision['width']) // int(vision.get('head_width', 64))
    if 'heads' in text:
        stated['text_heads'] = int(text['heads'])
    return stated


def _archive_statements(archive: TorchArchive) -> dict[str, Any]:
    """A TorchScript archive's activation (its MLP activation modules' class) and, when scripted, heads."""
    modules = archive.modules()
    found: dict[str, str] = {}  # activation -> the class that says it
    for module in modules.values():
        kind = module.type_name.rsplit('.', 1)[-1]
        if kind == 'QuickGELU':
            found['quick_gelu'] = kind
        elif kind == 'GELU':
            approximate = module.attributes.get('approximate', 'none')
            found['gelu_tanh' if approximate == 'tanh' else 'gelu_exact'] = f'GELU({approximate!r})'
    if len(found) > 1:
        raise InputError(f'{archive.path}: its towers run different activations ({sorted(found)})')
    if found:
        (name, kind), = found.items()
        activation = StatedActivation(name, f'{archive.path.name}: its MLP activation modules are {kind}')
    else:
        activation = StatedActivation('quick_gelu', "an OpenAI TorchScript archive (OpenAI's CLIPs run "
                                                    'QuickGELU)')
    stated: dict[str, Any] = {'activation': activation, 'heads_source': f'{archive.path.name} num_heads'}
    for tower, prefix in (('vision', 'visual.transformer.resblocks.0.attn'),
                          ('text', 'transformer.resblocks.0.attn')):
        heads = modules.get(prefix, None)
        if heads is not None and isinstance(heads.attributes.get('num_heads'), int):
            stated[f'{tower}_heads'] = heads.attributes['num_heads']
    return stated


def image_params_for_model(ckpt: ClipCheckpoint, init_visual: Mapping[str, Any]) -> Tree:
    """The checkpoint's image-tower params shaped for a model whose 'visual' params are ``init_visual``.

    The model's attention heads are taken (the per-head grouping is a reshape), and its position grid:
    a checkpoint made for another image size is resampled as open_clip does (bicubic, antialiased).
    Any other difference (width, patch size, layers, MLP or embedding width, a missing tensor) is one
    InputError naming the file's tensor and both shapes.
    """
    model = _vision_size_of(flatten(init_visual))
    if ckpt.vision_heads_stated and model.heads != ckpt.vision.heads:
        raise InputError(f'{ckpt.path}: the checkpoint\'s image tower has {ckpt.vision.heads} attention '
                         f'heads, the model {model.heads}')
    layout = layouts.TRANSFORMERS if ckpt.format.startswith('transformers') else layouts.OPEN_CLIP
    theirs = {e.key: e.shape for e in layouts.vision_entries(layout, ckpt.vision)}
    grid_key = layout.vision_pos_key
    for entry in layouts.vision_entries(layout, model):
        shape = theirs.get(entry.key)
        if shape is None:
            raise InputError(f'{ckpt.path}: tensor {entry.key} is missing from the checkpoint '
                             f'(the model needs {entry.shape})')
        if shape != entry.shape and not (entry.key == grid_key and shape[1] == entry.shape[1]):
            raise InputError(f'{ckpt.path}: tensor {entry.key} has shape {shape} in the checkpoint, '
                             f'but the model needs {entry.shape}')
    extra = sorted(set(theirs) - {e.key for e in layouts.vision_entries(layout, model)})
    if extra:
        raise InputError(f'{ckpt.path}: tensor {extra[0]} {theirs[extra[0]]} is in the checkpoint but '
                         f'not in the model (the checkpoint has {ckpt.vision.layers} layers, the model '
                         f'{model.layers})')
    flat_init = flatten(init_visual)
    out = {}
    for path, value in flatten(ckpt.image_params).items():
        target = tuple(np.shape(flat_init[path]))
        if path == 'positional_embedding' and value.shape != target:
            value = resample_posemb(value[None], (1, *target), 1, method='bicubic_antialias')[0]
        out[path] = np.reshape(value, target)  # the heads: [W, H, d] <-> [W, H', d'] is a reshape
    return unflatten(out)


def _vision_size_of(flat: Mapping[str, Any]) -> VisionSize:
    """The image tower a model's 'visual' params describe."""
    shape = lambda path: tuple(np.shape(flat[path]))  # noqa: E731
    patch, _, _, width = shape('conv1/kernel')
    grid = shape('positional_embedding')[0] - 1
    layers = len({p.split('/')[1] for p in flat if p.startswith('transformer/resblocks_')})
    heads = shape('transformer/resblocks_0/attn/query/kernel')[1] if layers else 1
    mlp = shape('transformer/resblocks_0/mlp/c_fc/kernel')[1] if layers else 4 * width
    side = math.isqrt(grid)
    return VisionSize(image_size=side * patch, patch_size=patch, width=width, layers=layers,
                      heads=heads, mlp_dim=mlp, embed_dim=shape('proj')[1])


def stated_activation(path: str | Path) -> StatedActivation | None:
    """What a CLIP file says about its activation (rules 1-3 of the module docstring), reading no tensor
    data: None for a bare state dict. For training's `resolve_activation`."""
    path = Path(path)
    if path.is_dir():
        return _hf_config(path / 'config.json')['activation'] if (path / 'config.json').is_file() else None
    if (path.parent / 'config.json').is_file() and path.name in HF_WEIGHTS:
        return _hf_config(path.parent / 'config.json')['activation']
    if path.suffix != '.safetensors' and _is_torchscript(path):
        return _archive_statements(TorchArchive(path))['activation']
    if (path.parent / 'open_clip_config.json').is_file():
        return _open_clip_config(path.parent / 'open_clip_config.json')['activation']
    return None
