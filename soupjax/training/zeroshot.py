"""CLIP's zero-shot head: the start the model-soups paper fine-tunes from (``head_init='zeroshot'``).

For each class, CLIP's text tower embeds every template filled with the class name; the embeddings are
normalised, averaged and normalised again (Radford et al. 2021, and the official model-soups
``zeroshot.py``). The head is those class vectors applied to normalised image features, times 100 as
the official ``zeroshot.py`` and ``finetune.py`` scale it (CLIP's trained exp(logit_scale) is 100):
``models.clip.CLIPClassifier``'s ``head/kernel`` [E, C] = 100 * W and ``head/bias`` = 0.

Class names come from the data set (TFDS's label names, ``soupjax.data.class_names``) or a file the user
gives (``config.zeroshot.classnames``, one per line); templates from a file (``config.zeroshot.templates``,
one per line, ``{}`` for the class name), "a photo of a {}." by default. The paper used OpenAI's curated
ImageNet class names and 80 templates: open_clip ships both (``open_clip.zero_shot_metadata``), and
README shows how to write them to the two files. The tokenizer is read offline from the files that come
with the checkpoint, or from ``config.zeroshot.tokenizer`` (soupjax.text).

A sweep computes the head once: it is kept beside the shared start, in
``<ingredients>/zeroshot_head-<key>.npz`` (key: the checkpoint file, the class names, the templates, the
tokenizer), and every ingredient's start is the same bit for bit.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from soupjax.cli.errors import InputError
from soupjax.io.files import as_path, is_url, write_atomic

if TYPE_CHECKING:
    import ml_collections

    from soupjax.importers.clip_checkpoint import ClipCheckpoint
    from soupjax.text.clip_tokenizer import ClipTokenizer

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
# The official zeroshot.py returns 100 * the unit class vectors; finetune.py starts from that head.
ZEROSHOT_SCALE = 100.0
# Texts encoded per jitted call: large enough to keep an accelerator busy, small enough for a CPU's memory.
TEXT_BATCH = 256


def read_templates(path: str | os.PathLike) -> list[str]:
    """Templates from a file, one per line (blank lines ignored), each with one ``{}`` for the class name."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise InputError(f"zero-shot templates {path}: cannot be read ({e.strerror or e})") from None
    templates = [line for line in lines if line]
    if not templates:
        raise InputError(f"zero-shot templates {path}: no template in the file (one per line, '{{}}' for the class name)")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise InputError(f"zero-shot templates {path}: template {number} {template!r} must hold '{{}}' once, "
                             "where the class name goes")
    return templates


def encode_texts(checkpoint: "ClipCheckpoint", tokens: np.ndarray, *, batch_size: int = TEXT_BATCH) -> np.ndarray:
    """CLIP's text features (unnormalised, float32 [N, E]) of ``tokens`` (int32 [N, context])."""
    model = checkpoint.text_encoder()
    params = jax.device_put(checkpoint.text_params)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        pad = batch_size - len(chunk) if len(tokens) > batch_size else 0  # one compiled shape per call size
        padded = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)]) if pad else chunk
        out.append(np.asarray(apply(params, jnp.asarray(padded)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, checkpoint.text.embed_dim), np.float32)


def zeroshot_head(checkpoint: "ClipCheckpoint", tokenizer: "ClipTokenizer", classnames: Sequence[str],
                  templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
    """The zero-shot classifier, float32 [E, C] with unit columns (as open_clip's
    ``build_zero_shot_classifier`` returns): column c is the normalised mean of the normalised text
    features of every template filled with ``classnames[c]``. Not scaled (``ZEROSHOT_SCALE`` is applied
    where it becomes a head)."""
    if not classnames:
        raise InputError("zero-shot head: no class names")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise InputError(f"zero-shot head: every template must hold '{{}}' once, got {list(templates)!r}")
    texts = [template.format(name) for name in classnames for template in templates]
    tokens = tokenizer.tokenize(texts, context_length=checkpoint.text.context_length)
    logging.info("zero-shot head: %d classes x %d templates", len(classnames), len(templates))
    features = encode_texts(checkpoint, tokens).astype(np.float64)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    per_class = features.reshape(len(classnames), len(templates), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
    return per_class.T.astype(np.float32)


def head_variables(weights: np.ndarray) -> dict[str, np.ndarray]:
    """CLIPClassifier's ``head`` params of a zero-shot classifier ``weights`` [E, C]: 100 * W, bias 0."""
    return {"kernel": (ZEROSHOT_SCALE * np.asarray(weights, np.float32)).astype(np.float32),
            "bias": np.zeros(weights.shape[1], np.float32)}


def zeroshot_option(config: "ml_collections.ConfigDict", name: str) -> str:
    """``config.zeroshot.<name>`` ('' when the config has no ``zeroshot`` section: the CLIP config files
    define it, other configs need not carry it)."""
    section = config.get("zeroshot") or {}
    return str(section.get(name, "") or "")


def class_names_for(config: "ml_collections.ConfigDict") -> list[str]:
    """``config.zeroshot.classnames``'s file (every class of the data set in label order, or exactly the
    kept ``data.classes`` in their order), or the data set's label names for the classes it uses."""
    from soupjax.data import class_names as names
    return names.class_names(config.data, zeroshot_option(config, "classnames") or None)


def _tokenizer_for(config: "ml_collections.ConfigDict") -> "ClipTokenizer":
    from soupjax.text.clip_tokenizer import ClipTokenizer
    return ClipTokenizer.from_path(zeroshot_option(config, "tokenizer") or config.init_from.path)


def _file_identity(path: str | os.PathLike) -> list[Any]:
    """What names a checkpoint file or directory for the cache key without reading its tensors."""
    if is_url(path):
        # An object in a bucket: named by its URL alone (its size and time are not read through every
        # backend alike), so a file replaced under the same URL needs its cached head deleted by hand.
        return [str(path)]
    path = Path(path).absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def zeroshot_start_head(config: "ml_collections.ConfigDict", cache_dir: str | os.PathLike | None = None,
                        ) -> dict[str, np.ndarray]:
    """The head a ``head_init='zeroshot'`` run starts from (``head_variables`` of ``zeroshot_head``), for
    ``config.init_from.path``'s CLIP: read from ``cache_dir`` when it was computed there before."""
    from soupjax.config.base import fingerprint
    classnames = class_names_for(config)
    template_file = zeroshot_option(config, "templates")
    templates = read_templates(template_file) if template_file else list(DEFAULT_TEMPLATES)
    tokenizer_path = zeroshot_option(config, "tokenizer")
    identity = {"checkpoint": _file_identity(config.init_from.path),
                "tokenizer": _file_identity(tokenizer_path) if tokenizer_path else None,
                "classnames": classnames, "templates": templates, "scale": ZEROSHOT_SCALE}
    key = fingerprint(identity)
    cached = as_path(cache_dir) / f"zeroshot_head-{key}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with cached.open("rb") as f, np.load(f) as stored:
            return {"kernel": stored["kernel"], "bias": stored["bias"]}
    from soupjax.importers.clip_checkpoint import read_clip
    # The head needs the text tower alone: the image tower (read by base_init already) stays unread.
    checkpoint = read_clip(config.init_from.path, image=False, activation=config.model.get("activation"),
                           allow_activation_mismatch=bool(config.init_from.get("allow_activation_mismatch", False)))
    if checkpoint.text_params is None:
        raise InputError(f"head_init='zeroshot': {config.init_from.path} has no text tower to build the head with "
                         "(a fine-tuned model-soups file? start from the CLIP checkpoint it was fine-tuned from)")
    head = head_variables(zeroshot_head(checkpoint, _tokenizer_for(config), classnames, templates))
    if cached is not None:
        if not is_url(cached):  # an object store has no folders to make
            cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, lambda tmp: np.savez(tmp, **head))
    return head
