"""``build_model(config)``: the Flax module a run's config describes.

Training, soups, merges and evaluations all rebuild the model of an ingredient from its stored config
through here, so that they agree on it (the class count of the data, the GELU of the init checkpoint).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn

if TYPE_CHECKING:  # ml_collections is only needed for the annotation
    import ml_collections


def build_model(config: "ml_collections.ConfigDict") -> nn.Module:
    """The Flax module described by ``config.model`` for ``config.data``'s number of classes, with the
    GELU its ``init_from`` checkpoint was trained with (``pretrained.with_checkpoint_activation``)."""
    # Imported here: soupjax.data imports TensorFlow, which soupjax.models must not need to be imported
    # (the step benchmark runs on hosts with JAX alone); pretrained imports soupjax.models in turn.
    from soupjax import data
    from soupjax.importers import pretrained
    from soupjax.models import get_model

    config = pretrained.with_checkpoint_activation(config)
    kwargs = dict(config.model.to_dict())
    name = kwargs.pop("name")
    return get_model(name, data.num_classes(config.data), **kwargs)
