"""The model registry: `get_model(name, num_classes, **cfg)` builds a Flax linen module by name, and the
vocabulary of activations that meta.json records (`activation(model)`, `ACTIVATIONS`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from soupjax.models.clip import CLIP_ACTIVATIONS, CLIP_SIZES, CLIPClassifier
from soupjax.models.clip import classifier as clip_classifier
from soupjax.models.resnet import RESNET_CONFIGS, ResNet
from soupjax.models.vit import VIT_SIZES, VIT_TESTING, VisionTransformer


# The names get_model knows, with the usual patch sizes; 'vit-{ti,s,b,l,h}/{p}' accepts any p.
MODEL_NAMES: tuple[str, ...] = (
    'vit-ti/16', 'vit-s/16', 'vit-s/32', 'vit-b/16', 'vit-b/32', 'vit-l/16', 'vit-l/32',
    'vit-h/14', 'vit-testing', 'vit',
    *RESNET_CONFIGS,
    *CLIP_SIZES,
)

_VIT_NAME = re.compile(r'vit-(ti|s|b|l|h)/(\d+)')
_VIT_REQUIRED = ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'patch_size')


def list_models() -> list[str]:
    """The names `get_model` accepts (ViT names take other patch sizes too)."""
    return list(MODEL_NAMES)


def _fields(cls: type[nn.Module]) -> set[str]:
    # The dataclass fields a user may set; Flax adds `parent` and `name`, which are not config.
    return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name', 'num_classes'}


def _family(name: str) -> type[nn.Module]:
    """The module class a model name builds (no check of the rest of the name's cfg)."""
    key = name.lower()
    if key in ('vit', 'vit-testing') or _VIT_NAME.fullmatch(key):
        return VisionTransformer
    if key in RESNET_CONFIGS:
        return ResNet
    if key in CLIP_SIZES:
        return CLIPClassifier
    raise ValueError(f'unknown model {name!r}; known: {", ".join(MODEL_NAMES)} '
                     "(ViT names take any patch size, e.g. 'vit-b/8')")


def config_keys(name: str) -> set[str]:
    """The cfg keys `get_model(name, ...)` accepts: e.g. whether the model has `gelu_approximate`."""
    return _fields(_family(name))


# The nonlinearities meta.json records under 'activation', and the GELU each ViT one names
# (VisionTransformer.gelu_approximate: True is the tanh approximation).
GELU_OF_ACTIVATION: dict[str, bool] = {'gelu_exact': False, 'gelu_tanh': True}
# CLIP adds OpenAI's QuickGELU (x * sigmoid(1.702 x)); a CLIP model runs any of CLIP_ACTIVATIONS.
ACTIVATIONS: tuple[str, ...] = (*GELU_OF_ACTIVATION, 'relu', 'quick_gelu')


def activation(model: nn.Module) -> str:
    """The nonlinearity a built model runs, as meta.json records it.

    'gelu_exact' or 'gelu_tanh' for a ViT (its `gelu_approximate`), 'relu' for a ResNet.
    Training records it; cooking and the API build an ingredient's model with it (models.build_model).
    """
    if isinstance(model, VisionTransformer):
        return 'gelu_tanh' if model.gelu_approximate else 'gelu_exact'
    if isinstance(model, ResNet):
        return 'relu'
    if isinstance(model, CLIPClassifier):
        return model.activation
    raise TypeError(f'not a soupjax model: {type(model).__name__}')


def with_activation(name: str, cfg: dict[str, Any], activation_name: str) -> dict[str, Any]:
    """`cfg` (the keyword arguments of `get_model(name, ...)`) set to run `activation_name`.

    A ViT's GELU is its `gelu_approximate` field; a ResNet runs 'relu' only. ValueError when the
    activation is not one of ACTIVATIONS, not one the model family has, or contradicts a
    `gelu_approximate` that cfg sets (the activation recorded with an ingredient is the one its config
    resolved to, so the two can only disagree in a file edited by hand).
    """
    if activation_name not in ACTIVATIONS:
        raise ValueError(f'activation must be one of {list(ACTIVATIONS)}, got {activation_name!r}')
    if _family(name) is ResNet:
        if activation_name != 'relu':
            raise ValueError(f'{name} is a ResNet, which runs relu, not {activation_name}')
        return cfg
    if _family(name) is CLIPClassifier:
        if activation_name not in CLIP_ACTIVATIONS:
            raise ValueError(f'{name} is a CLIP, which runs one of {sorted(CLIP_ACTIVATIONS)}, not {activation_name}')
        configured = cfg.get('activation')
        if configured is not None and configured != activation_name:
            raise ValueError(f'{name}: model.activation={configured!r} contradicts the activation {activation_name!r}')
        return {**cfg, 'activation': activation_name}
    if activation_name not in GELU_OF_ACTIVATION:
        raise ValueError(f'{name} is a ViT, which runs a GELU, not {activation_name}')
    approximate = GELU_OF_ACTIVATION[activation_name]
    configured = cfg.get('gelu_approximate')
    if configured is not None and bool(configured) != approximate:
        raise ValueError(f'{name}: model.gelu_approximate={bool(configured)} contradicts the activation '
                         f'{activation_name!r} (gelu_approximate={approximate})')
    return {**cfg, 'gelu_approximate': approximate}


def _build(cls: type[nn.Module], name: str, num_classes: int, base: dict[str, Any],
           cfg: dict[str, Any]) -> nn.Module:
    unknown = set(cfg) - _fields(cls)
    if unknown:
        raise TypeError(f'{name}: unknown config keys {sorted(unknown)}; '
                        f'allowed: {sorted(_fields(cls))}')
    # Lists become tuples: modules are hashed when their methods are jitted.
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if isinstance(cfg.get('dtype'), str):
        # From a config file or the command line (`--config.model.dtype=bfloat16`): the computation
        # dtype; parameters stay float32 whatever it is.
        if cfg['dtype'] not in ('float32', 'bfloat16', 'float16'):
            raise ValueError(f"{name}: dtype must be 'float32', 'bfloat16' or 'float16', got {cfg['dtype']!r}")
        cfg['dtype'] = jnp.dtype(cfg['dtype'])
    return cls(num_classes=num_classes, **{**base, **cfg})


def get_model(name: str, num_classes: int, **cfg: Any) -> nn.Module:
    """Builds a model by name; `cfg` overrides any field of the module (see its docstring).

    Names (case-insensitive): 'vit-{ti,s,b,l,h}/{patch}', 'vit-testing' (a tiny ViT for tests),
    'vit' (shape fully given by cfg: hidden_size, num_layers, num_heads, mlp_dim, patch_size),
    'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet50d', 'resnet-testing',
    'clip-vit-b/32', 'clip-vit-b/16', 'clip-vit-l/14', 'clip-testing' (CLIP's image tower and a head on
    its normalised features: models.clip.CLIPClassifier).

    ViT cfg: patch_size, hidden_size, num_layers, num_heads, mlp_dim, pooling ('token' | 'gap'),
    dropout_rate, attention_dropout_rate, representation_size, gelu_approximate (default False,
    the exact GELU of timm; True is the tanh approximation that vision_transformer and big_vision
    trained with: soupjax.importers.activation.resolve_activation picks the init checkpoint's),
    head_zero_init (default True), dtype.
    CLIP cfg: activation ('quick_gelu' | 'gelu_exact' | 'gelu_tanh'; from the init checkpoint when
    unset: importers.activation.resolve_activation), head_zero_init, dtype, and the tower's widths.
    ResNet cfg: stem ('imagenet' | 'deep' | 'cifar'), avg_down, width, bn_momentum (default 0.9,
    i.e. PyTorch's 0.1), zero_init_last_bn, stage_sizes, block ('basic' | 'bottleneck'), dtype.
    """
    key = name.lower()
    if key == 'vit-testing':
        return _build(VisionTransformer, name, num_classes, VIT_TESTING, cfg)
    if key == 'vit':
        missing = [k for k in _VIT_REQUIRED if k not in cfg]
        if missing:
            raise ValueError(f"model 'vit' needs {missing} in cfg")
        return _build(VisionTransformer, name, num_classes, {}, cfg)
    match = _VIT_NAME.fullmatch(key)
    if match:
        size, patch = match.groups()
        return _build(VisionTransformer, name, num_classes,
                      {**VIT_SIZES[size], 'patch_size': int(patch)}, cfg)
    if key in RESNET_CONFIGS:
        return _build(ResNet, name, num_classes, RESNET_CONFIGS[key], cfg)
    if key in CLIP_SIZES:
        # The image tower of the size, and its head; the text tower is not part of the model
        # (it builds zero-shot heads: soupjax.training.zeroshot).
        default = clip_classifier(key, num_classes)
        base = {f: getattr(default, f) for f in _fields(CLIPClassifier)}
        return _build(CLIPClassifier, name, num_classes, base, cfg)
    raise ValueError(f'unknown model {name!r}; known: {", ".join(MODEL_NAMES)} '
                     "(ViT names take any patch size, e.g. 'vit-b/8')")
