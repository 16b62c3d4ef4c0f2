"""The released model-soups ingredients as soupjax ingredients (``python -m soupjax.import_ingredients``).

The official repository (mlfoundations/model-soups) released its 72 fine-tuned CLIP ViT-B/32 models as
``model_{i}.pt``: each the state dict of its ``ModelWrapper``, i.e. ``model.`` + CLIP's keys with the
text blocks deleted (``model.transformer.*``; the text embeddings, ``ln_final`` and ``text_projection``
stay), plus ``classification_head.weight`` [C, E] and ``.bias`` [C] applied to the L2-normalised image
features. Each becomes ``OUT/<stem>`` (``model_0``, ...), an ingredient in the layout fine-tuning writes
(``io.checkpoints``: orbax ``variables/`` + ``meta.json``, staged and renamed into place), so that
``python -m soupjax.soup --ingredients OUT`` cooks them.

    ingredients = import_model_soups(["model_0.pt", ...], "ingredients", config=config, base="ViT-B-32.pt")

With a base (the CLIP the ingredients were fine-tuned from, OpenAI's ``ViT-B-32.pt``), ``OUT/start`` is
written as fine-tuning writes it (``training.shared_init``): the base's image tower and 100 x CLIP's
zero-shot classifier of the config's class names and templates, the paper's start. Every ingredient
records the ``init_fingerprint`` and ``start_fingerprint`` a fine-tuning run from that base records,
so the merges (task arithmetic, TIES, ...) and WiSE-FT take their θ0 from it. Without a base there is
no start: the soups (uniform, greedy, ...) cook, and what needs θ0 is refused, saying why.

Order of work, so that bad input leaves nothing half-written: every file is looked at first (tensor
names and shapes from the archive's pickle or the safetensors header, no tensor data; its sha256), and
refused with one ``InputError`` naming it when it is missing, not a model-soups file, of another size
than the first, or not the config's model; then the start; then one file at a time is read, converted
and written. Reading a file reads its image tower and head one tensor at a time from the archive's
storage records (``clip_checkpoint.read_clip``: the text tower's tensors are never read, torch is not
imported), so the one whole-model copy a file costs is the converted tree being saved; after each
file the freed memory is handed back (``release_freed_memory``), so nothing grows from file to file.
An ingredient already imported from a file of the same sha256 with the same settings is skipped, so an
interrupted import resumes.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import datetime
import hashlib
import os
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import ml_collections
import numpy as np

from soupjax.cli.errors import InputError
from soupjax.cli.progress import Progress
from soupjax.importers import clip_layouts as layouts
from soupjax.importers.clip_checkpoint import STATE_DICT_SUFFIXES, image_params_for_model, read_clip
from soupjax.importers.clip_torch_archive import safetensors_tensors, tensor_shapes
from soupjax.io import checkpoints
from soupjax.io.trees import flatten

FORMAT = "model-soups"
FORMATS = (FORMAT,)
# The ModelWrapper's names: its CLIP under `model.`, its head beside it.
PREFIX = "model."
HEAD_WEIGHT, HEAD_BIAS = "classification_head.weight", "classification_head.bias"
# The run config used when none is given: the paper's setting (the released files are its ingredients).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "imagenet_clip_vit_b32.py"
# What meta.json says of the start when there is none, for whoever reads why the merges cannot be cooked.
NO_START = ("imported without --base: there is no start θ0, so the merges and WiSE-FT cannot be cooked; "
            "import again with --base CLIP_FILE (the CLIP the files were fine-tuned from)")
_HASH_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class ReleasedFile:
    """One file to import, as looked at before anything is read: where, its name, its tensors' shapes
    (the image tower and the head, by the file's names) and its sha256."""

    path: Path
    name: str
    shapes: dict[str, tuple[int, ...]]
    sha256: str
    size: int


def default_config() -> ml_collections.ConfigDict:
    """configs/imagenet_clip_vit_b32.py, the paper's setting; ``InputError`` when soupjax runs without its
    configs/ folder (installed as a package), saying to pass a config."""
    from soupjax.config.base import load_config
    if not DEFAULT_CONFIG.is_file():
        raise InputError(f"the default config {DEFAULT_CONFIG} is not there (soupjax installed without its "
                         "configs/ folder): give the run config the ingredients were fine-tuned with (--config FILE)")
    return load_config(str(DEFAULT_CONFIG))


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_names_and_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of a state-dict file by name, with its shape, reading no tensor data (the pickle of a
    PyTorch zip, or a safetensors header); ``InputError`` naming the file when it is neither."""
    if path.suffix == ".safetensors":
        try:
            return {k: v.shape for k, v in safetensors_tensors(path).items()}
        except InputError as e:
            raise InputError(f"{path}: not a model-soups file ({e})") from None
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a model-soups file (not a PyTorch zip archive as torch.save writes, "
                         "nor a .safetensors file)")
    try:
        return {k: tuple(v) for k, v in tensor_shapes(path).items()}
    except InputError as e:
        raise InputError(f"{path}: not a model-soups file ({e})") from None


def _model_soups_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The image tower's and the head's tensors of a model-soups file; ``InputError`` when it is not one."""
    shapes = tensor_names_and_shapes(path)
    if HEAD_WEIGHT not in shapes or not any(k.startswith(PREFIX + "visual.") for k in shapes):
        if any(k.startswith(("visual.", "vision_model.")) for k in shapes):
            what = "a CLIP checkpoint without the ModelWrapper's classification head (a plain CLIP goes in --base)"
        else:
            what = f"no {PREFIX}visual.* tensors and no {HEAD_WEIGHT}"
        raise InputError(f"{path}: not a model-soups file ({what}; expected the state dict of the official "
                         f"ModelWrapper: {PREFIX}visual.*, {HEAD_WEIGHT}, {HEAD_BIAS})")
    return {k: v for k, v in shapes.items()
            if k.startswith(PREFIX + "visual.") or k in (HEAD_WEIGHT, HEAD_BIAS)}


def survey(files: Sequence[str | os.PathLike], *, stream: TextIO | None = None) -> list[ReleasedFile]:
    """Every file looked at (names, shapes, sha256; no tensor read), or ``InputError`` naming the first
    that is missing, not a model-soups file, or of another size than the first."""
    if not files:
        raise InputError("no files to import: give the model-soups files (model_0.pt ...) as arguments")
    paths = [Path(f).absolute() for f in files]
    names: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a file (a model-soups ingredient is one .pt file)")
        if path.suffix not in STATE_DICT_SUFFIXES:
            raise InputError(f"{path}: not a model-soups file (expected one of {', '.join(STATE_DICT_SUFFIXES)})")
        name = path.stem
        if name in names:
            raise InputError(f"{path} and {names[name]} would both be the ingredient {name!r}: give files of "
                             "different names")
        if name == "start" or name.startswith("."):
            raise InputError(f"{path}: an ingredient cannot be named {name!r} (the start is written there); rename "
                             "the file")
        names[name] = path
    progress = Progress(len(paths), "check", unit="files", every=10.0, stream=stream)
    surveyed: list[ReleasedFile] = []
    for path in paths:
        shapes = _model_soups_shapes(path)
        if surveyed:
            _same_size(surveyed[0], path, shapes)
        surveyed.append(ReleasedFile(path, path.stem, shapes, file_sha256(path), path.stat().st_size))
        progress(1, file=path.name)
    return surveyed


def _same_size(first: ReleasedFile, path: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for key in sorted(set(first.shapes) | set(shapes)):
        mine, theirs = shapes.get(key), first.shapes.get(key)
        if mine != theirs:
            said = "missing" if mine is None else f"of shape {mine}"
            had = "none" if theirs is None else f"{theirs}"
            raise InputError(f"{path}: tensor {key} is {said}, but {first.path} has {had}: the files are of "
                             "different sizes (every ingredient must be the same model)")


def import_config(config: ml_collections.ConfigDict | None, *, base: str | os.PathLike | None = None,
                  classnames: str | os.PathLike | None = None, templates: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None) -> tuple[ml_collections.ConfigDict, Path | None]:
    """The run config the ingredients record, and the base: ``config`` (default ``default_config()``)
    with the base as ``init_from.path`` (a ``base`` given, else the config's own ``init_from.path``),
    ``head_init='zeroshot'`` when there is a base (the paper's start), and the zero-shot options given.
    ``InputError`` for a model that is not a CLIP or a base that is not there."""
    config = copy.deepcopy(config if config is not None else default_config())
    if "clip" not in str(config.model.get("name", "")).lower():
        raise InputError(f"--config: model {config.model.get('name')!r} is not a CLIP (clip-vit-b/32, ...): the "
                         "model-soups files are CLIP ViTs; give a CLIP config, e.g. configs/imagenet_clip_vit_b32.py")
    with config.unlocked():
        if base is not None:
            config.init_from.path = str(Path(base).absolute())
        base_path = Path(config.init_from.path) if config.init_from.path else None
        if base_path is not None:
            if not base_path.exists():
                raise InputError(f"--base {base_path}: no such file or directory")
            config.head_init = "zeroshot"
        if "zeroshot" not in config:
            config.zeroshot = ml_collections.ConfigDict({"classnames": "", "templates": "", "tokenizer": ""})
        for field, value in (("classnames", classnames), ("templates", templates), ("tokenizer", tokenizer)):
            if value is not None:
                if not Path(value).exists():
                    raise InputError(f"--{field} {value}: no such file")
                config.zeroshot[field] = str(Path(value).absolute())
    return config, base_path


def _activation(config: ml_collections.ConfigDict, base: Path | None) -> tuple[str, str]:
    """The CLIP activation the ingredients run, and how it is known: the base's (as fine-tuning resolves
    it) or, without a base, the config's model.activation, else OpenAI's QuickGELU (the released files
    are fine-tunes of OpenAI's ViT-B/32; a state dict does not say)."""
    from soupjax.importers.activation import ActivationMismatchError, resolve_activation
    if base is not None:
        try:
            return resolve_activation(config), f"the base {base.name}'s, as fine-tuning from it resolves it"
        except ActivationMismatchError as e:
            raise InputError(str(e)) from None
    configured = config.model.get("activation")
    if configured:
        return str(configured), "the config's model.activation"
    return "quick_gelu", "OpenAI's QuickGELU (the model-soups files are fine-tunes of OpenAI's CLIP ViT-B/32)"


def _model_size(model: Any, image_size: int) -> layouts.VisionSize:
    return layouts.VisionSize(image_size=image_size, patch_size=model.patch_size, width=model.width,
                              layers=model.layers, heads=model.heads, mlp_dim=model.mlp_dim or 4 * model.width,
                              embed_dim=model.embed_dim)


def check_against_model(first: ReleasedFile, model: Any, config: ml_collections.ConfigDict, num_classes: int) -> None:
    """``InputError`` naming the first tensor of ``first`` (every file has its sizes) that the config's model
    does not have, or has in another shape: another width, patch, depth, image size or class count."""
    described = f"the config's model {config.model.name} at {config.data.image_size} px with {num_classes} classes"
    expected = {PREFIX + e.key: e.shape for e in layouts.vision_entries(
        layouts.OPEN_CLIP, _model_size(model, int(config.data.image_size)))}
    expected[HEAD_WEIGHT] = (num_classes, model.embed_dim)
    if HEAD_BIAS in first.shapes:
        expected[HEAD_BIAS] = (num_classes,)
    for key, shape in expected.items():
        have = first.shapes.get(key)
        if have != shape:
            said = "is missing" if have is None else f"has shape {have}"
            raise InputError(f"{first.path}: tensor {key} {said}, but {described} needs {shape} (another model or "
                             "data set: give the config the files were fine-tuned with, --config)")
    extra = sorted(k for k in first.shapes if k not in expected and not layouts.is_ignored(k.removeprefix(PREFIX)))
    if extra:
        raise InputError(f"{first.path}: tensor {extra[0]} {first.shapes[extra[0]]} has no place in {described} "
                         f"({len(extra)} such tensors)")


def check_zeroshot_inputs(config: ml_collections.ConfigDict) -> None:
    """The zero-shot start's class names, templates and tokenizer read (``InputError`` naming a missing or
    unfit one), before anything is written: what ``write_start`` will need besides the base's weights."""
    from soupjax.text.clip_tokenizer import ClipTokenizer
    from soupjax.training import zeroshot
    zeroshot.class_names_for(config)
    templates = zeroshot.zeroshot_option(config, "templates")
    if templates:
        zeroshot.read_templates(templates)
    ClipTokenizer.from_path(zeroshot.zeroshot_option(config, "tokenizer") or config.init_from.path)


@dataclasses.dataclass
class Start:
    """The shared start written beside the ingredients, by its fingerprints."""

    init_fingerprint: str
    start_fingerprint: str
    directory: Path


def write_start(config: ml_collections.ConfigDict, model: Any, activation: str, out: Path) -> Start:
    """``out/start``: the base's image tower and 100 x its zero-shot head, as fine-tuning from the base
    with head_init='zeroshot' starts (``shared_init.base_init`` then ``with_head_init``; the head kept
    in ``out`` as training keeps it), fingerprinted as training fingerprints it."""
    from soupjax.importers.fingerprint import weights_fingerprint
    from soupjax.importers.merge import PretrainedMismatchError
    from soupjax.training import shared_init
    try:
        base = shared_init.base_init(config, model)
        init_fingerprint = weights_fingerprint(base["params"])
        start = shared_init.with_head_init(config, base, model, cache_dir=out)
    except PretrainedMismatchError as e:
        raise InputError(f"--base {config.init_from.path}: does not fit {config.model.name}: {e}") from None
    start_fingerprint = weights_fingerprint(start)
    directory = shared_init.start_directory(out)
    shared_init.save_start(directory, start, config=config, init_fingerprint=init_fingerprint,
                           start_fingerprint=start_fingerprint, activation=activation)
    return Start(init_fingerprint, start_fingerprint, directory)


def read_ingredient(released: ReleasedFile, model: Any, abstract: Mapping[str, Any], activation: str) -> dict[str, Any]:
    """One file's variables in ``model``'s tree ({'params': {'visual', 'head'}}, float32), checked against
    its ``abstract`` variables (shapes)."""
    params = abstract["params"]
    ckpt = read_clip(released.path, activation=activation, vision_heads=model.heads, text=False)
    if ckpt.head is None:
        raise InputError(f"{released.path}: not a model-soups file (no {HEAD_WEIGHT})")
    visual = image_params_for_model(ckpt, params["visual"])
    variables = {"params": {"visual": visual, "head": ckpt.head}}
    want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(variables).items()}
    if want != got:
        path = next(p for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p))
        raise InputError(f"{released.path}: parameter {path} is {got.get(path)} after conversion, the model's "
                         f"{want.get(path)}")
    return {"params": {"visual": visual, "head": {k: np.asarray(v, np.float32) for k, v in ckpt.head.items()}}}


def release_freed_memory() -> None:
    """Hands memory the process has freed back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks in its arenas for reuse, one arena per thread that allocated them (orbax's
    and tensorstore's writer threads among them), so without this the resident size of an import climbs
    file after file (+472 MiB from 1 to 16 files in docs/benchmarks.md) though nothing is kept."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


def _settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What, besides the file, makes an imported ingredient: compared on a rerun."""
    return {k: meta.get(k) for k in ("activation", "init_fingerprint", "start_fingerprint", "format")}


def _existing(directory: Path, released: ReleasedFile, meta: Mapping[str, Any], overwrite: bool) -> bool:
    """Whether ``directory`` already holds this import (skip it); ``InputError`` when it holds another
    model, unless ``overwrite``. One imported from the same file with other settings is imported again."""
    from soupjax.config.base import MAY_DIFFER, changed_fields
    if not directory.exists():
        return False
    source = {}
    if checkpoints.is_ingredient(directory):
        stored = checkpoints.load_meta(directory)
        source = stored.get("source") or {}
        if source.get("sha256") == released.sha256:
            same = _settings(stored) == _settings(meta) and not changed_fields(
                stored.get("config"), meta["config"], ignore=MAY_DIFFER)
            return same
    if overwrite:
        return False
    what = (f"an ingredient imported from another file ({source.get('file')}, sha256 {source.get('sha256', '?')[:12]})"
            if source else "something that is not an ingredient imported from this file")
    raise InputError(f"{directory} holds {what}; {released.path} would replace it: move it away, choose another "
                     "--out, or pass --overwrite")


def ingredient_meta(released: ReleasedFile, config: ml_collections.ConfigDict, activation: str,
                    activation_source: str, start: Start | None) -> dict[str, Any]:
    """The meta.json of an imported ingredient: what a fine-tuned one records where it applies (name,
    config, activation, init and start fingerprints, init_from) and where it came from (``source``)."""
    from soupjax.io.files import plain
    meta: dict[str, Any] = {
        "name": released.name,
        "format": FORMAT,
        "config": plain(config.to_dict()),
        "activation": activation,
        "activation_source": activation_source,
        "init_from": config.init_from.path or "",
        "source": {"format": FORMAT, "file": str(released.path), "sha256": released.sha256, "bytes": released.size},
        "metrics": {},  # evaluated when cooked, on the cook's data
        "hparams": {},
    }
    if start is not None:
        meta["init_fingerprint"] = start.init_fingerprint
        meta["start_fingerprint"] = start.start_fingerprint
    else:
        meta["start_note"] = NO_START
    return meta


def import_model_soups(files: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                       config: ml_collections.ConfigDict | None = None, base: str | os.PathLike | None = None,
                       classnames: str | os.PathLike | None = None, templates: str | os.PathLike | None = None,
                       tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
                       stream: TextIO | None = None) -> list[Path]:
    """Import model-soups files as ingredients in ``out`` (the module docstring); returns their directories.

    Args:
      files: the official ``model_{i}.pt`` files; each becomes ``out/<stem>``.
      out: the ingredients' directory (created).
      config: the run config they were fine-tuned with (model, data; default configs/imagenet_clip_vit_b32.py).
      base: the CLIP they were fine-tuned from: writes ``out/start`` (the zero-shot start) for the merges
        and WiSE-FT. Default: the config's ``init_from.path``; none, no start.
      classnames, templates, tokenizer: the zero-shot head's files (else the config's ``zeroshot`` fields:
        the data set's class names, "a photo of a {}.", the tokenizer beside the base).
      overwrite: replace an ingredient in ``out`` of the same name imported from another file.
      stream: where progress lines go (stderr).
    """
    from soupjax import data
    from soupjax.models import build_model_from_run_config
    from soupjax.training.shared_init import input_shape
    import jax
    import jax.numpy as jnp

    stream = stream or sys.stderr
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: a file, not a directory")
    config, base_path = import_config(config, base=base, classnames=classnames, templates=templates,
                                      tokenizer=tokenizer)
    released = survey(files, stream=stream)
    activation, activation_source = _activation(config, base_path)
    with config.unlocked():
        config.model.activation = activation  # the config itself says what a soup of these runs
    num_classes = data.num_classes(config.data)
    model = build_model_from_run_config(config, activation)
    check_against_model(released[0], model, config, num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape(config)), train=False))
    # Every conflict with what is in `out` is found before the first write.
    if base_path is not None:
        check_zeroshot_inputs(config)
    metas = [ingredient_meta(r, config, activation, activation_source, None) for r in released]
    for r, meta in zip(released, metas):
        _existing(out / r.name, r, meta, overwrite)
    from soupjax.io.files import writable_problem
    problem = writable_problem(out, create=True)
    if problem:
        raise InputError(f"--out {out}: not writable: {problem}")
    start = write_start(config, model, activation, out) if base_path is not None else None
    progress = Progress(len(released), "import", unit="files", every=0.0, stream=stream)
    written = []
    for r in released:
        meta = ingredient_meta(r, config, activation, activation_source, start)
        directory = out / r.name
        if _existing(directory, r, meta, overwrite):
            progress(1, file=r.name, skipped="already imported")
            written.append(directory)
            continue
        began = time.time()
        variables = read_ingredient(r, model, abstract, activation)
        release_freed_memory()  # the source tensors' bytes, read and dropped one by one
        meta["imported"] = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "seconds": round(time.time() - began, 3)}
        checkpoints.save_ingredient(directory, variables, meta)
        del variables  # the one converted tree goes before the next file is read
        release_freed_memory()  # what saving it used, so the next file starts where this one did
        written.append(directory)
        progress(1, file=r.name, MB_s=r.size / 2**20 / max(time.time() - began, 1e-9))
    return written
