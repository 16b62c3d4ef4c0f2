"""The names of the classes a data config uses, for CLIP's zero-shot classifier ("a photo of a {name}.").

Two sources:
  * the data set: TFDS's label names (``ClassLabel.names``), read from the builder's info without preparing
    or reading any data; underscores become spaces (``american_pit_bull_terrier`` -> ``american pit bull
    terrier``);
  * a file the user gives: one name a line, blank lines and the whitespace around a name ignored. Either
    a line for every class of the data set, in its label order (line i names label id i), or, with
    ``data.classes``, a line for each kept class in that order (the model's order).
``data.classes`` picks and orders the data set's names as the pipeline relabels: the model's class i is
``data.classes[i]`` of the data set.

Some data sets have no words for names, and are refused with a pointer to the file: ImageNet's TFDS names
are WordNet ids (``n01440764``), and a data set whose names are read from its files at preparation
(CIFAR-100) has only numbers until it is prepared. For ImageNet give OpenAI's curated names, which
open_clip ships (not copied here)::

    python -c "import open_clip; print('\\n'.join(open_clip.IMAGENET_CLASSNAMES))" > imagenet_classnames.txt

They are what the CLIP zero-shot numbers (and model soups' zero-shot start) were measured with.
"""
from __future__ import annotations

import re

import tensorflow as tf
import tensorflow_datasets as tfds

from soupjax.cli.errors import InputError
from soupjax.data import fashion_mnist_local  # noqa: F401  (registers the local Fashion-MNIST builder)

_WORDNET_ID = re.compile(r"n\d{8}")


def class_names(data_config, path: str | None = None) -> list[str]:
    """The model's class names: name i is that of the data set's label ``data.classes[i]`` (label i
    when ``data.classes`` is None).

    Read from ``path`` (see `read_class_names` and `check_class_names`) or, without one, TFDS's label
    names with underscores as spaces. ``InputError`` for an unknown data set, bad ``data.classes``, a
    file that does not fit, or label names that are not words (WordNet ids, bare numbers: give a file).
    """
    if path:
        names = check_class_names(read_class_names(path), data_config, path)
        total = len(dataset_label_names(data_config))
        return [names[c] for c in _kept(data_config, total)] if len(names) == total else names
    names = [name.replace("_", " ") for name in dataset_label_names(data_config)]
    _refuse_unreadable(names, data_config.name)
    return [names[c] for c in _kept(data_config, len(names))]


def dataset_label_names(data_config) -> list[str]:
    """TFDS's label names of the data set, all of them in label order, as the builder's info has them
    (from the prepared data set's metadata where there is one, else from the builder's code)."""
    try:
        builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise InputError(f"unknown dataset {data_config.name!r}: TFDS has no builder of that name") from None
    keys = tuple(builder.info.supervised_keys or ("image", "label"))
    feature = builder.info.features[keys[1]]
    if not isinstance(feature, tfds.features.ClassLabel):
        raise InputError(f"data set {data_config.name!r}: its label {keys[1]!r} is not a class label")
    return list(feature.names)


def read_class_names(path: str) -> list[str]:
    """The class names in the text file ``path`` (local or ``gs://``): one a line, blank lines and
    surrounding whitespace ignored, duplicates kept (OpenAI's ImageNet names have two). ``InputError``
    naming the file when it is missing, not UTF-8 text, or holds no names."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (tf.errors.NotFoundError, FileNotFoundError):
        raise InputError(f"class names file {path} not found") from None
    except (tf.errors.OpError, OSError, UnicodeDecodeError) as e:
        raise InputError(f"class names file {path} cannot be read as UTF-8 text: {type(e).__name__}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"class names file {path} holds no class names (expected one name a line)")
    return names


def check_class_names(names: list[str], data_config, path: str) -> list[str]:
    """``names`` (read from ``path``) when there is one for every class of the data set, or one for each
    class ``data.classes`` keeps; ``InputError`` naming the file and the counts otherwise."""
    total = len(dataset_label_names(data_config))
    kept = None if data_config.classes is None else len(data_config.classes)
    if len(names) not in (total, kept):
        raise InputError(
            f"class names file {path} holds {len(names)} names, but data set {data_config.name!r} has {total} "
            "classes" + (f" and data.classes keeps {kept}" if kept is not None else "") + ": give one name a "
            "line for each class of the data set in label order" + (", or for each kept class in the order of "
                                                                   "data.classes" if kept is not None else ""))
    return names


def _kept(data_config, n: int) -> list[int]:
    """The label ids the model's classes are, in its order (the pipeline's rule for data.classes)."""
    if data_config.classes is None:
        return list(range(n))
    classes = [int(c) for c in data_config.classes]
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < n for c in classes):
        raise InputError(f"classes must be distinct label ids in [0, {n}), got {list(data_config.classes)}")
    return classes


def _refuse_unreadable(names: list[str], dataset: str) -> None:
    kind = ("WordNet ids" if all(_WORDNET_ID.fullmatch(n) for n in names) else
            "numbers (the names are known once the data set is prepared)" if all(n.isdigit() for n in names)
            else None)
    if kind:
        raise InputError(f"data set {dataset!r}'s label names are {kind} ({', '.join(names[:2])}, ...), not "
                         "words a text encoder can use: give the class names in a file, one a line in label "
                         "order (for ImageNet, open_clip's IMAGENET_CLASSNAMES: see soupjax.data.class_names)")
