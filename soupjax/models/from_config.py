"""The Flax module of a model config, a class count and an activation: nothing else, and no file read.

Training resolves the activation once, when the run starts (``soupjax.importers.activation``: the GELU
the init checkpoint was trained with), and records it in the ingredient's meta.json; cooking, merges
and evaluations rebuild an ingredient's model from its stored config and that recorded activation, so
that they agree with training without opening the init checkpoint again.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn

from soupjax.models.registry import get_model, with_activation

if TYPE_CHECKING:  # ml_collections is only needed for the annotations
    import ml_collections


def build_model(model_config: Mapping[str, Any] | "ml_collections.ConfigDict", num_classes: int,
                activation: str | None = None) -> nn.Module:
    """The module ``model_config`` (a run config's ``model``: ``name`` plus ``get_model``'s cfg)
    describes, with ``num_classes`` outputs.

    ``activation`` (one of ``registry.ACTIVATIONS``, as meta.json records it) sets the nonlinearity; a
    ViT's ``gelu_approximate`` follows it. None leaves it to ``model_config``'s own fields (a run from
    scratch, or an ingredient trained before activations were recorded).
    """
    kwargs = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    name = kwargs.pop("name")
    if activation is not None:
        kwargs = with_activation(name, kwargs, activation)
    return get_model(name, num_classes, **kwargs)


def build_model_from_run_config(config: "ml_collections.ConfigDict", activation: str | None = None) -> nn.Module:
    """``build_model`` for a whole run config: ``config.model``, the class count of ``config.data``.

    ``activation`` as for ``build_model``: training passes the one it resolved from ``init_from``
    (``importers.activation.resolve_activation``), cooking the one an ingredient's meta.json records.
    The init checkpoint is never opened here.
    """
    # Imported here: soupjax.data imports TensorFlow, which soupjax.models must not need to be imported
    # (the step benchmark runs on hosts with JAX alone).
    from soupjax import data
    return build_model(config.model, data.num_classes(config.data), activation)
