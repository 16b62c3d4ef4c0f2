"""Model registry: `get_model(name, num_classes, **cfg)` returns a Flax linen module;
`build_model(config)` the one a run's config describes.

Every model is called as `module.apply(variables, images, train=False)` on float32 NHWC images
and returns float32 logits [B, num_classes]. ViTs hold {'params'}; ResNets hold {'params',
'batch_stats'} and need mutable=['batch_stats'] when train=True.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from soupjax.models.from_config import build_model
from soupjax.models.resnet import RESNET_CONFIGS, ResNet
from soupjax.models.vit import VIT_SIZES, VIT_TESTING, VisionTransformer

__all__ = ['MODEL_NAMES', 'ResNet', 'VisionTransformer', 'activation', 'build_model', 'config_keys',
           'get_model', 'list_models']

# The names get_model knows, with the usual patch sizes; 'vit-{ti,s,b,l,h}/{p}' accepts any p.
MODEL_NAMES: tuple[str, ...] = (
    'vit-ti/16', 'vit-s/16', 'vit-s/32', 'vit-b/16', 'vit-b/32', 'vit-l/16', 'vit-l/32',
    'vit-h/14', 'vit-testing', 'vit',
    *RESNET_CONFIGS,
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
    raise ValueError(f'unknown model {name!r}; known: {", ".join(MODEL_NAMES)} '
                     "(ViT names take any patch size, e.g. 'vit-b/8')")


def config_keys(name: str) -> set[str]:
    """The cfg keys `get_model(name, ...)` accepts: e.g. whether the model has `gelu_approximate`."""
    return _fields(_family(name))


def activation(model: nn.Module) -> str:
    """The nonlinearity a built model runs, as meta.json records it.

    'gelu_exact' or 'gelu_tanh' for a ViT (its `gelu_approximate`), 'relu' for a ResNet.
    soupjax.importers.pretrained.checkpoint_activation reads it back when a run starts from an ingredient.
    """
    if isinstance(model, VisionTransformer):
        return 'gelu_tanh' if model.gelu_approximate else 'gelu_exact'
    if isinstance(model, ResNet):
        return 'relu'
    raise TypeError(f'not a soupjax model: {type(model).__name__}')


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
    'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet50d', 'resnet-testing'.

    ViT cfg: patch_size, hidden_size, num_layers, num_heads, mlp_dim, pooling ('token' | 'gap'),
    dropout_rate, attention_dropout_rate, representation_size, gelu_approximate (default False,
    the exact GELU of timm; True is the tanh approximation that vision_transformer and big_vision
    trained with: soupjax.importers.pretrained.with_checkpoint_activation picks the init checkpoint's),
    head_zero_init (default True), dtype.
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
    raise ValueError(f'unknown model {name!r}; known: {", ".join(MODEL_NAMES)} '
                     "(ViT names take any patch size, e.g. 'vit-b/8')")
