"""The fields every training config has, and the ``:key=value`` options of config files.

Config files in ``configs/`` start from ``base_config()`` and change what they need, so train.py can
rely on every field being present and ``--config.key=value`` overrides always find their key.
"""
from __future__ import annotations

import ast
from typing import Any

import ml_collections


def parse_options(arg: str | None) -> dict[str, Any]:
    """Parse the part after ``:`` in ``--config configs/X.py:testing,sweep=8``.

    A bare word is a flag set to True; ``key=value`` values are Python literals when they parse as
    one (``8``, ``0.1``, ``[1,2]``) and strings otherwise.
    """
    options: dict[str, Any] = {}
    if not arg:
        return options
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            options[key.strip()] = True
            continue
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def check_options(options: dict[str, Any], known: set[str], config_name: str) -> None:
    """Refuse unknown config options by name instead of silently ignoring a typo."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{config_name}: unknown option(s) {unknown}; known: {sorted(known)}")


def base_config() -> ml_collections.ConfigDict:
    """Defaults for one fine-tuning run (one ingredient) and for a sweep of them."""
    from soupjax.data import default_data_config

    c = ml_collections.ConfigDict()
    c.name = "ingredient"          # the ingredient's directory name when this is not a sweep
    c.seed = 0                     # data order, augmentation, dropout, mixup
    c.init_seed = 0                # model initialisation: shared by a sweep so ingredients share an init
    c.data = default_data_config()
    c.model = ml_collections.ConfigDict({"name": "vit-testing"})
    c.init_from = ml_collections.ConfigDict({
        "path": "",                # '' = from scratch; a .npz, a timm file, or an ingredient directory
        "dont_load": ["head/.*"],  # regexes of parameters that keep their initial value
        # A ViT runs the GELU its checkpoint was trained with (.npz: tanh, timm: exact); a config that
        # says otherwise is refused unless this is True (soupjax.pretrained.with_checkpoint_activation).
        "allow_activation_mismatch": False,
    })
    # 'default' keeps the model's own head init; 'linear_probe' fits the head on frozen features of
    # the init first (LP-FT), which is what makes fine-tuned ingredients land in one basin.
    c.head_init = "default"
    c.linear_probe = ml_collections.ConfigDict({"num_examples": 4096, "l2": 1e-3, "steps": 300})

    c.optimizer = "sgd"            # 'sgd' (with momentum) or 'adamw'
    c.learning_rate = 0.003
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.warmup_steps = 0
    # 'cosine': warm-up, then cosine to 0 over the run. 'plateau': warm-up, constant until the held-out
    # accuracy levels off (see `plateau`), then linear to 0 over plateau.cooldown_steps; the run's
    # length (num_epochs / total_steps) is then the most it may take.
    c.lr_schedule = "cosine"
    c.eval_every_steps = 0         # > 0: held-out accuracy every N steps (the learning curve, in meta.json)
    c.plateau = ml_collections.ConfigDict({
        "min_delta": 0.003,        # levelled off: an evaluation less than this above the best before it...
        "patience": 1,             # ...this many times in a row
        "cooldown_steps": 0,       # then the linear decay to 0 (with lr_schedule='plateau')
    })
    c.num_epochs = 1.0
    c.total_steps = 0              # > 0 overrides num_epochs
    c.batch_size = 128
    c.eval_batch_size = 256
    c.grad_clip_norm = 1.0         # 0 disables clipping
    c.label_smoothing = 0.0

    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.keep_train_checkpoints = False

    # A sweep fine-tunes `count` ingredients, each with hyperparameters drawn from `space`
    # (random search, as in the paper). Keys of `space` are config paths; values are
    # ['log_uniform', lo, hi], ['uniform', lo, hi] or ['choice', [v1, v2, ...]].
    # Nested keys mirror the config (e.g. {"data": {"mixup_alpha": [...]}}): ConfigDict keys have no dots.
    c.sweep = ml_collections.ConfigDict({"count": 0, "seed": 0, "space": {}})
    return c


def as_plain(config: Any) -> Any:
    """A config (ConfigDict or dict) as plain JSON values, so two can be compared whatever their origin
    (a live ConfigDict, or one read back from meta.json: tuples become lists, references values)."""
    import json
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two configs, with both values."""
    a, b = as_plain(a), as_plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if a != b:
        return [f"{prefix.rstrip('.')}: {a!r} != {b!r}"]
    return []


def refuse_changed(stored: Any, config: Any, what: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Raise ValueError when ``config`` differs from ``stored`` (the config ``what`` was made with),
    naming the differing fields; dotted fields in ``ignore`` may differ."""
    diff = [d for d in differences(stored, config) if d.split(":", 1)[0] not in ignore]
    if diff:
        raise ValueError(f"{what} was made with a different config; differing fields: " + "; ".join(diff[:8])
                         + ". Use another work directory, or remove it to start over.")


def fingerprint(config: Any) -> str:
    """A short hash of a config's plain JSON form (e.g. of the data section, to key cached logits)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(as_plain(config), sort_keys=True).encode()).hexdigest()[:16]
