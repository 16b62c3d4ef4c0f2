"""The fields every training config has, the ``:key=value`` options of config files, and loading them.

Config files in ``configs/`` start from ``base_config()`` and change what they need, so train.py can
rely on every field being present and ``--config.key=value`` overrides always find their key.

Nothing here imports TensorFlow or JAX: a bad config file, option or field value is refused (with an
``InputError`` naming it) in the first second of a command, before anything is started or written.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from soupjax.cli.errors import InputError
from soupjax.io.files import plain


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
        raise InputError(f"{config_name}: unknown option(s) {unknown}; known: {sorted(known)}")


def int_option(options: dict[str, Any], key: str, default: int, config_name: str, *, minimum: int = 0) -> int:
    """The integer option ``key`` (``default`` when absent), refused by name when it is not a whole
    number or is below ``minimum`` (``sweep=-2`` must not quietly mean one ingredient)."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{config_name}: option {key}={value!r} must be a whole number")
    if value < minimum:
        raise InputError(f"{config_name}: option {key}={value} must be at least {minimum}")
    return value


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults: Fashion-MNIST at 32x32 RGB, CIFAR-style augmentation.

    It lives here, not in ``soupjax.data``, so that building a config does not import TensorFlow;
    ``soupjax.data.default_data_config`` is this function.
    """
    return ml_collections.ConfigDict(dict(
        name="fashion_mnist_local",  # soupjax.data.fashion_mnist_local.NAME: the offline default
        # None -> TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR); typed str, so a path can be set.
        data_dir=ml_collections.config_dict.placeholder(str),
        download=False,         # let TFDS download and prepare missing data sets
        heldout=0.1,            # fraction in (0, 1) or count (>= 1) of the train split held out; 0 = none
        # Of what is left for training, the fraction that training sees: its first examples in file order,
        # the same for every run (a small fine-tuning set); the held-out split is unchanged.
        train_fraction=1.0,
        # Evaluate only the first N examples of the test split and of the shifts made from it; 0 = all.
        # For smoke tests of tiny models (the `testing` variants), never for a result.
        test_examples=0,
        classes=None,           # None, or original label ids to keep, relabelled 0..n-1 in this order
        image_size=32,
        channels=3,             # 3: grayscale tiled to RGB; 1: RGB converted to grayscale
        normalize="inception",  # 'inception' [-1, 1] | 'imagenet' / 'clip' mean/std | 'unit' [0, 1]
        resize_method="bilinear",  # 'bilinear' | 'bicubic' (CLIP, timm): every resize, training and evaluation
        train_crop="pad_crop",  # 'random_resized' (Inception) | 'pad_crop' (CIFAR) | 'resize'
        pad=4,
        flip=True,
        aug_strength=1.0,       # 0 = resize (+ flip) only; scales crop area/aspect ranges and pad
        mixup_alpha=0.0,        # 0 = off
        # RandAugment (soupjax.data.randaugment, torchvision's ops) after the crop and flip, training only:
        # N ops per image (0 = off) at magnitude bin M of 31 (30 = each op's strongest; torchvision's 9).
        randaugment_ops=0,
        randaugment_magnitude=9,
        shuffle_buffer=50_000,
        eval_crop_pct=1.0,      # 1.0 = plain resize; 0.875 = resize shorter side to size/0.875, centre crop
        # 'square': eval_crop_pct 1 squashes to [size, size], below 1 as above; 'shorter_side': shorter side
        # to floor(size / eval_crop_pct), then the centre (torchvision's Resize + CenterCrop: CLIP, timm).
        eval_resize="square",
        # 'default', a list of split names, or the names comma-separated. A FieldReference typed `object`
        # so that a list can replace the string; after a to_dict() round trip use the comma form.
        shifts=ml_collections.FieldReference("default", field_type=object),
        cache=True,             # decode splits of one image shape into memory (else cache raw records)
    ))


# Fields that change only how training images are drawn, or where the files live: two configs that
# differ in these alone give the same evaluation examples, so logits computed under one serve the other.
TRAINING_ONLY_FIELDS = ("data_dir", "download", "train_crop", "pad", "flip", "aug_strength", "mixup_alpha",
                        "randaugment_ops", "randaugment_magnitude", "shuffle_buffer", "shifts", "cache",
                        "train_fraction")


def eval_fingerprint(cfg) -> str:
    """A hash of what decides the evaluation examples of every split (not the training augmentation).

    An ingredient's training-time logits are reused when cooking only under the same hash; a sweep
    over augmentation strength or mixup must not make every ingredient be evaluated again. Fields added
    later (``ADDED_AT_DEFAULT``) are left out at their defaults: configs older than them keep their hash.
    """
    return fingerprint({k: v for k, v in plain(cfg).items()
                        if k not in TRAINING_ONLY_FIELDS and (f"data.{k}", v) not in ADDED_AT_DEFAULT.items()})


def base_config() -> ml_collections.ConfigDict:
    """Defaults for one fine-tuning run (one ingredient) and for a sweep of them."""
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
        # says otherwise is refused unless this is True (soupjax.importers.activation.resolve_activation).
        "allow_activation_mismatch": False,
    })
    # 'default' keeps the model's own head init; 'linear_probe' fits the head on frozen features of
    # the init first (LP-FT), which is what makes fine-tuned ingredients land in one basin; 'zeroshot'
    # (CLIP models) is CLIP's zero-shot classifier, the paper's start (soupjax.training.zeroshot).
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


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two configs, with both values."""
    a, b = plain(a), plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if a != b:
        return [f"{prefix.rstrip('.')}: {a!r} != {b!r}"]
    return []


# Fields in which finished work (an ingredient, a training state) may differ from the config asked for
# and still be the same work: where the data files live (it changes between machines; what they contain
# may not), and how many ingredients the sweep has (a draw depends only on the sweep seed and its index,
# so a sweep can be extended, even while one of its ingredients is half trained).
MAY_DIFFER = ("data.data_dir", "sweep.count")


# Data fields added after work was first stored, at their defaults: a stored config without one was made
# with what the default does (soupjax.data reads a missing one as its default), so it is the same work.
ADDED_AT_DEFAULT = {"data.resize_method": "bilinear", "data.eval_resize": "square", "data.randaugment_ops": 0,
                    "data.randaugment_magnitude": 9, "data.train_fraction": 1.0,
                    "data.test_examples": 0}


def changed_fields(stored: Any, config: Any, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """``differences`` less the dotted fields in ``ignore`` and the fields of ``ADDED_AT_DEFAULT`` that
    ``stored`` lacks where ``config`` holds their default."""
    added = {f"{path}: None != {value!r}" for path, value in ADDED_AT_DEFAULT.items()}
    return [d for d in differences(stored, config) if d.split(":", 1)[0] not in ignore and d not in added]


def refuse_changed(stored: Any, config: Any, what: str, *, ignore: tuple[str, ...] = (),
                   remedy: str = "Use another work directory, or remove it to start over.") -> None:
    """Raise ``InputError`` when ``config`` differs from ``stored`` (the config ``what`` was made with),
    naming the differing fields; dotted fields in ``ignore`` may differ."""
    diff = changed_fields(stored, config, ignore=ignore)
    if diff:
        raise InputError(f"{what} was made with a different config; differing fields: " + "; ".join(diff[:8])
                         + (f" (and {len(diff) - 8} more)" if len(diff) > 8 else "") + f". {remedy}")


def fingerprint(config: Any) -> str:
    """A short hash of a config's plain JSON form (e.g. of the data section, to key cached logits)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(plain(config), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ loading config files


def load_config_module(path: str):
    """Import the config file at ``path`` (configs/ is not a package).

    ``InputError`` when the file is missing, does not run, or defines no ``get_config``: the message
    names the file, so a typo in a path never ends in an import traceback.
    """
    if not path:
        raise InputError("no config file given: expected FILE[:options], e.g. configs/fashion_mnist_vit.py")
    file = Path(path)
    if not file.is_file():
        raise InputError(f"config file {path} not found" + (": it is a directory" if file.is_dir() else ""))
    spec = importlib.util.spec_from_file_location(f"soupjax_config_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise InputError(f"config file {path} is not a Python file (expected a .py file defining get_config)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except InputError:
        raise
    except Exception as e:  # the user's file: a syntax error or a failing import is bad input, not our bug
        raise InputError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise InputError(f"config file {path} defines no get_config(options) function")
    return module


def config_from_module(module, path: str, options: str | None) -> ml_collections.ConfigDict:
    """``module.get_config(options)`` (``get_config()`` without options, as ml_collections calls it),
    with whatever it raises turned into an ``InputError`` that names the file and the options."""
    shown = f"{path}:{options}" if options else path
    try:
        config = module.get_config(options) if options else module.get_config()
    except InputError:
        raise  # the config names itself and the option
    except Exception as e:
        raise InputError(f"{shown}: get_config failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(f"{shown}: get_config returned {type(config).__name__}, not an ml_collections ConfigDict")
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``FILE[:options]`` -> the checked ConfigDict its ``get_config(options)`` returns."""
    path, _, options = spec.partition(":")
    config = config_from_module(load_config_module(path), path, options or None)
    check_config(config)
    return config


def check_override_paths(config: ml_collections.ConfigDict, paths: list[str]) -> None:
    """Refuse a ``--config.PATH=value`` whose PATH is not a field of ``config``, naming the closest
    fields (ml_collections would raise a bare KeyError deep inside absl's flag parsing)."""
    for path in paths:
        node, walked = config, []
        for part in path.split("."):
            if not part.isidentifier():
                break  # an index (``classes[0]``): left to ml_collections, which reports it in its words
            fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in fields:
                where = f"config.{'.'.join(walked)}" if walked else "the config"
                close = difflib.get_close_matches(part, fields, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; its fields: {', '.join(sorted(fields))}"
                raise InputError(f"--config.{path}: {where} has no field {part!r}{hint}")
            node, walked = node[part], walked + [part]


# Allowed values of the shared fields: checked once, before anything is imported or written, so that a
# value out of range is refused with its name instead of failing (or, worse, running) deep in training.
# The one home of these choices: the trainer (train_step, shared_init) checks its values here too.
CHOICES = {"optimizer": ("sgd", "adamw"), "lr_schedule": ("cosine", "plateau"),
           "head_init": ("default", "linear_probe", "zeroshot"),
           # The data pipeline's (soupjax.data.preprocessing); the first is the default.
           "data.resize_method": ("bilinear", "bicubic"), "data.eval_resize": ("square", "shorter_side")}
_AT_LEAST = {"batch_size": 1, "eval_batch_size": 1, "total_steps": 0, "warmup_steps": 0, "eval_every_steps": 0,
             "log_every_steps": 1, "checkpoint_every_steps": 1, "weight_decay": 0, "label_smoothing": 0,
             "grad_clip_norm": 0, "sweep.count": 0, "sweep.seed": 0, "seed": 0, "init_seed": 0,
             "data.image_size": 1, "data.heldout": 0, "data.pad": 0, "data.aug_strength": 0, "data.mixup_alpha": 0,
             "data.randaugment_ops": 0, "data.randaugment_magnitude": 0,
             "linear_probe.num_examples": 1, "linear_probe.steps": 1}


RANDAUGMENT_BINS = 31  # soupjax.data.randaugment.NUM_BINS (that module imports TensorFlow)


def check_choice(path: str, value: Any) -> Any:
    """``value`` of the field ``config.<path>`` (a key of ``CHOICES``), when it is one of its choices;
    ``InputError`` naming the field and the choices otherwise."""
    if value not in CHOICES[path]:
        raise InputError(f"config.{path}={value!r} must be one of {', '.join(map(repr, CHOICES[path]))}")
    return value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse values of the shared fields that are out of range, naming the field, the value and the range.

    ``sweep.count=0`` is one ingredient (no sweep); a negative count, a zero batch size, an unknown
    optimizer... are errors, never quietly read as something else.
    """
    def value(path: str):
        node = config
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                return None  # a config that lacks the field: nothing to check
            node = node[part]
        return node

    for path, lowest in _AT_LEAST.items():
        v = value(path)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"config.{path}={v!r} must be a number")
        if v < lowest:
            raise InputError(f"config.{path}={v!r} must be at least {lowest}"
                             + (" (0 fine-tunes one ingredient, without a sweep)" if path == "sweep.count" else ""))
    for path in CHOICES:
        v = value(path)
        if v is not None:
            check_choice(path, v)
    for path in ("data.randaugment_ops", "data.randaugment_magnitude"):  # numbers >= 0 (checked above)
        v = value(path)
        if v is not None and not isinstance(v, int):
            raise InputError(f"config.{path}={v!r} must be a whole number")
    bins = value("data.randaugment_magnitude")
    if bins is not None and bins > RANDAUGMENT_BINS - 1:
        raise InputError(f"config.data.randaugment_magnitude={bins!r} must be at most {RANDAUGMENT_BINS - 1}: "
                         f"a bin of RandAugment's {RANDAUGMENT_BINS} magnitudes (torchvision's scale)")
    lr = value("learning_rate")
    if lr is not None and not lr > 0:
        raise InputError(f"config.learning_rate={lr!r} must be above 0")
    steps, epochs = value("total_steps"), value("num_epochs")
    if steps == 0 and epochs is not None and not epochs > 0:
        raise InputError(f"config.num_epochs={epochs!r} must be above 0 when config.total_steps is 0")
    heldout = value("data.heldout")
    if heldout == 0:
        # Every ingredient is evaluated on it (soups rank by it): refused here, before TensorFlow loads,
        # and again by soupjax.data.check_heldout with the data set's numbers.
        raise InputError("config.data.heldout=0: fine-tuning needs a held-out split, carved from the training "
                         "split (a fraction in (0, 1) or a count of examples), for the held-out accuracy that "
                         "soups rank ingredients by")
    fraction = value("data.train_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise InputError(f"config.data.train_fraction={fraction!r} must be a fraction in (0, 1]: the share of the "
                         "training split (after the held-out tail) that training reads")
    limit = value("data.test_examples")
    if limit is not None and not (isinstance(limit, int) and limit >= 0):
        raise InputError(f"config.data.test_examples={limit!r} must be a whole number >= 0 (0: the whole test split)")
    if heldout is not None and heldout >= 1 and not float(heldout).is_integer():
        raise InputError(f"config.data.heldout={heldout!r} must be a fraction in (0, 1) or a whole count of "
                         "training examples")
