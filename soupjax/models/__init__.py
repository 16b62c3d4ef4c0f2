"""Models: ``get_model(name, num_classes, **cfg)`` returns a Flax linen module (models/registry.py);
``build_model(model_config, num_classes, activation)`` the one a run's config describes
(models/from_config.py). Neither reads a file.

Every model is called as `module.apply(variables, images, train=False)` on float32 NHWC images
and returns float32 logits [B, num_classes]. ViTs hold {'params'}; ResNets hold {'params',
'batch_stats'} and need mutable=['batch_stats'] when train=True.
"""

from __future__ import annotations

from soupjax.models.from_config import build_model, build_model_from_run_config
from soupjax.models.registry import (
    ACTIVATIONS,
    GELU_OF_ACTIVATION,
    MODEL_NAMES,
    activation,
    config_keys,
    get_model,
    list_models,
    with_activation,
)
from soupjax.models.resnet import ResNet
from soupjax.models.vit import VisionTransformer

__all__ = ['ACTIVATIONS', 'GELU_OF_ACTIVATION', 'MODEL_NAMES', 'ResNet', 'VisionTransformer', 'activation',
           'build_model', 'build_model_from_run_config', 'config_keys', 'get_model', 'list_models',
           'with_activation']
