"""The activation a checkpoint was trained with, and the one a run fine-tuning from it must run.

The GELU of the ViT's MLP is not the same function in every codebase: vision_transformer and
big_vision call Flax's nn.gelu, whose default is the tanh approximation, timm calls PyTorch's
nn.GELU(), the exact erf. The two differ by up to 4.7e-4 per activation (near |x| = 2.7); the
logits of AugReg checkpoints run with the wrong one move by 4e-4 to 7e-4 (as reported when this
was found), far above float32 rounding. A model initialised from a checkpoint runs with the GELU
the checkpoint was trained with (models/vit.py `gelu_approximate`), unless the config says
otherwise on purpose.

Training resolves it once, when the run starts (`resolve_activation`), builds its model with it and
records it in the ingredient's meta.json ('activation'); everything after builds the ingredient's
model from that record (soupjax.models.build_model), without opening the init checkpoint again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from soupjax import models
from soupjax.importers.dispatch import source_of

if TYPE_CHECKING:
    from ml_collections import ConfigDict


@dataclasses.dataclass(frozen=True)
class CheckpointActivation:
    """The GELU of the ViT in a checkpoint: `gelu_approximate` (True: tanh) and how it is known."""

    gelu_approximate: bool
    source: str  # e.g. 'a vision_transformer/big_vision .npz', for messages

    @property
    def name(self) -> str:
        """As meta.json records it: 'gelu_tanh' or 'gelu_exact'."""
        return gelu_activation(self.gelu_approximate)


class ActivationMismatchError(ValueError):
    """The config asks for another GELU than the one the init checkpoint was trained with."""


def gelu_activation(approximate: bool) -> str:
    """The meta.json name of a GELU: 'gelu_tanh' (approximate) or 'gelu_exact'."""
    return 'gelu_tanh' if approximate else 'gelu_exact'


def gelu_name(approximate: bool) -> str:
    """'the tanh-approximate GELU' or 'the exact (erf) GELU', for messages."""
    return 'the tanh-approximate GELU' if approximate else 'the exact (erf) GELU'


def checkpoint_activation(path: str | Path) -> CheckpointActivation | None:
    """The GELU that the ViT in `path` was trained with, told by its source; None if unknown.

    A file of a source that knows its GELU (soupjax.importers.sources: a `.npz`, tanh; a timm state
    dict, exact). A soupjax ingredient directory: what its meta.json records under 'activation', else
    its config's model.gelu_approximate, else exact (the only GELU soupjax ran before it recorded
    one). Decided by name and metadata, without reading weights.
    """
    path = Path(path)
    source = source_of(path)
    if source is not None:
        if source.activation not in models.GELU_OF_ACTIVATION:
            return None
        described = source.name if source.name.endswith(path.suffix) else f'{source.name} ({path.suffix})'
        return CheckpointActivation(models.GELU_OF_ACTIVATION[source.activation], described)
    from soupjax.io import checkpoints  # orbax: only for ingredient directories
    if not checkpoints.is_ingredient(path):
        return None  # load_pretrained / merge_params will say what is wrong with it
    meta = checkpoints.load_meta(path)
    what = 'a soupjax ingredient'
    if 'activation' in meta:
        gelu = models.GELU_OF_ACTIVATION.get(meta['activation'])  # None: not a ViT ('relu')
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


def resolve_activation(config: ConfigDict) -> str | None:
    """The activation a run of `config` trains with, where its `init_from.path` decides it; else None.

    For a ViT initialised from a checkpoint whose GELU is known (`checkpoint_activation`):
      - model.gelu_approximate unset (or None), or set to the checkpoint's: the checkpoint's;
      - set to the other one: ActivationMismatchError, naming the file and both activations,
        unless `init_from.allow_activation_mismatch` is True (then the config's, with a warning).
    None for anything else (trained from scratch, a ResNet, an unknown source): the config's own
    fields decide, so models trained from scratch keep the model's default, the exact GELU. Reads at
    most the init's meta.json; `config` is not modified (it is what meta.json stores and what a
    resumed or repeated run is compared with).
    """
    path = config.init_from.path
    if path and 'activation' in models.config_keys(config.model.name):
        return _clip_activation(config)
    if not path or 'gelu_approximate' not in models.config_keys(config.model.name):
        return None
    needed = checkpoint_activation(path)
    if needed is None:
        return None
    configured = config.model.get('gelu_approximate')
    if configured is None or bool(configured) == needed.gelu_approximate:
        return needed.name
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
    return gelu_activation(bool(configured))


def _clip_activation(config: ConfigDict) -> str:
    """`resolve_activation` for a CLIP model (its `activation` field): what the init says (an ingredient's
    meta.json; a CLIP file's config or archive, importers.clip_checkpoint.stated_activation), else the
    config's, else OpenAI's QuickGELU with a warning (a bare state dict does not say). A config that
    contradicts what the file says is refused unless init_from.allow_activation_mismatch."""
    path, configured = config.init_from.path, config.model.get('activation')
    from soupjax.io import checkpoints  # orbax: only for ingredient directories
    if checkpoints.is_ingredient(path):
        recorded = checkpoints.load_meta(path).get('activation')
        stated = None if recorded is None else (recorded, 'a soupjax ingredient (its meta.json)')
    else:
        from soupjax.importers.clip_checkpoint import stated_activation
        said = stated_activation(path)
        stated = None if said is None else (said.name, said.source)
    if stated is None:
        if configured is None:
            logging.warning('%s does not say which activation its CLIP runs: QuickGELU, as OpenAI\'s weights '
                            '(set model.activation=gelu_exact for open_clip\'s LAION models without -quickgelu)',
                            path)
            return 'quick_gelu'
        return configured
    name, source = stated
    if configured is None or configured == name:
        return name
    if not config.init_from.get('allow_activation_mismatch', False):
        raise ActivationMismatchError(
            f'{path} runs {name} ({source}), but the config sets model.activation={configured!r}: with another '
            'activation the pretrained CLIP is not the function it was trained as. Leave model.activation out '
            'to use the checkpoint\'s, or set init_from.allow_activation_mismatch=True to fine-tune with '
            f'{configured} on purpose.')
    logging.warning('%s runs %s (%s); fine-tuning with %s as the config asks (init_from.allow_activation_mismatch)',
                    path, name, source, configured)
    return configured


def with_checkpoint_activation(config: ConfigDict) -> ConfigDict:
    """`config` with `model.gelu_approximate` set to the activation `resolve_activation` gives it.

    Unset (or None) in `config`: set in a copy; otherwise (agreeing, or a mismatch allowed on
    purpose) `config` itself is returned. Idempotent. For config files and tools that want the resolved
    GELU in the config itself; a run builds its model from `resolve_activation` instead.
    """
    resolved = resolve_activation(config)
    if resolved is None or config.model.get('gelu_approximate') is not None:
        return config
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.gelu_approximate = models.GELU_OF_ACTIVATION[resolved]
    return config
