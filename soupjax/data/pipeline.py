"""tf.data input pipelines over TFDS: deterministic, resumable training batches and padded eval batches.

Splits of a data config (see `default_data_config`):
  'train'    the training split minus the held-out tail: what fine-tuning sees (`train[:n]` in TFDS terms;
             its first `train_fraction` of that, for a small fine-tuning set);
  'heldout'  the last `heldout` examples of the training split (`train[n:]`), for greedy/learned soups;
  'test'     the TFDS 'test' split, or 'validation' where there is no 'test' (ImageNet);
  'shift/<corruption>-<severity>'  a deterministic corruption of 'test' (see shifts.py);
  natural shift sets of the data set ('imagenet_r', 'cifar10_1', ... see natural_shifts.py).
The held-out slice is fixed by position, before the `classes` filter, so it is the same images whatever
classes a run keeps.

Determinism. Everything random is keyed: epoch e of the training stream is shuffled with a seed made of
(seed, e, process), and the augmentation of a batch or example with a key made of (seed, its position in
the stream, process). So the stream is a pure function of the seed, and `start_step=s` starts it at
example s * batch without replaying what came before (see `train_batches` for the two ways it is read).
Eval batches are unaugmented and in file order; shift noise is keyed by the example's index in its split.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from soupjax.cli.errors import InputError
from soupjax.config.base import default_data_config, eval_fingerprint  # noqa: F401  (soupjax.data's API; TF-free home)
from soupjax.data import decoded_cache
from soupjax.data import fashion_mnist_local
from soupjax.data import natural_shifts
from soupjax.data import preprocessing as pp
from soupjax.data import randaugment
from soupjax.data import records
from soupjax.data import shifts

try:  # TF must leave the accelerators to JAX (a no-op for tensorflow-cpu).
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was already initialised by someone else.
    pass

# Every function given to tf.data is traced as written, not first rewritten by AutoGraph: none uses
# Python control flow on tensors (tracing would fail loudly if one did), and AutoGraph's parsing and
# rewriting of each one, and of everything it calls, took 2-3 CPU-seconds of every command's start-up.
_graph = tf.autograph.experimental.do_not_convert

BASE_SPLITS = ("train", "heldout", "test")
IN_MEMORY_MAX_BYTES = 4 << 30  # with cfg.cache, splits of one image shape up to this are decoded into memory
_SALT_SHUFFLE = 3


# ---------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved split: which TFDS builder and split to read, and how to relabel and corrupt it."""
    builder: tfds.core.DatasetBuilder
    tfds_split: str
    label_map: np.ndarray | None  # original label -> new label, -1 = drop; None = keep all as they are
    shift: tuple[str, int] | None = None

    @property
    def keys(self) -> tuple[str, str]:
        return tuple(self.builder.info.supervised_keys or ("image", "label"))[:2]


def _builder(cfg, name: str) -> tfds.core.DatasetBuilder:
    if name == fashion_mnist_local.NAME:
        return fashion_mnist_local.prepare(cfg.data_dir)
    try:
        builder = tfds.builder(name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        import difflib
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
        raise InputError(f"unknown dataset {name!r}: TFDS has no builder of that name"
                         + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + f"; the local default is {fashion_mnist_local.NAME!r}") from None
    if cfg.download:
        builder.download_and_prepare()
    return builder


def _check_split(cfg, split: str) -> None:
    if split not in BASE_SPLITS and shifts.parse(split) is None and natural_shifts.source(
        cfg.name, split) is None:
        natural = natural_shifts.splits_for(cfg.name)
        raise InputError(
            f"unknown split {split!r} for data set {cfg.name!r}. Valid splits: {', '.join(BASE_SPLITS)}; "
            f"'shift/<corruption>-<severity>' with corruption in {', '.join(shifts.CORRUPTIONS)} and "
            f"severity 1..5" + (f"; natural shifts: {', '.join(natural[:8])}"
                                + (f" (+{len(natural) - 8} more)" if len(natural) > 8 else "")
                                if natural else " (no natural shift sets for this data set)") + ".")


def _label_map(num_original: int, keep) -> np.ndarray:
    table = np.full([num_original], -1, np.int32)
    for new, old in enumerate(keep):
        table[old] = new
    return table


def _num_original_classes(builder) -> int:
    return builder.info.features[builder.info.supervised_keys[1] if builder.info.supervised_keys
                                 else "label"].num_classes


def _classes(cfg, builder) -> tuple[int, ...] | None:
    if cfg.classes is None:
        return None
    classes = tuple(int(c) for c in cfg.classes)
    n = _num_original_classes(builder)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < n for c in classes):
        raise InputError(f"classes must be distinct label ids in [0, {n}), got {list(cfg.classes)}")
    return classes


def _heldout_count(cfg, total: int) -> int:
    h = cfg.heldout
    if h is None or h == 0:
        return 0
    if 0 < h < 1:
        n = int(round(h * total))
    elif h >= 1 and float(h).is_integer():
        n = int(h)
    else:
        raise InputError(f"data.heldout must be a fraction in (0, 1) or a count >= 1, got {h!r}")
    if not 0 < n < total:
        raise InputError(f"data.heldout={_shown(h)} holds out {n} of the {total} examples of {cfg.name}'s training "
                         f"split, leaving {total - n} to fine-tune on: hold out between 1 and {total - 1}")
    return n


def _cardinality(builder, split) -> int:
    key = (str(builder.data_dir), builder.info.full_name, str(split))
    if key not in _CARDINALITIES:
        ds = builder.as_dataset(split=split, decoders=_skip_image(builder))
        n = int(ds.cardinality())
        _CARDINALITIES[key] = n if n >= 0 else int(ds.reduce(0, _graph(lambda c, _: c + 1)))
    return _CARDINALITIES[key]


def resolve(cfg, split: str) -> Source:
    """Where the examples of ``split`` come from: the TFDS builder and split string (the held-out split is
    the tail of TFDS's ``train`` that the training split stops at), the label map, the synthetic shift."""
    _check_split(cfg, split)
    builder = _builder(cfg, cfg.name)
    classes = _classes(cfg, builder)
    label_map = None if classes is None else _label_map(_num_original_classes(builder), classes)
    if split in ("train", "heldout"):
        total = _cardinality(builder, "train")
        n_heldout = _heldout_count(cfg, total)
        if split == "heldout":
            if n_heldout == 0:
                raise InputError("split 'heldout' requested but the data config has heldout=0")
            return Source(builder, f"train[{total - n_heldout}:]", label_map)
        # data.train_fraction < 1: a fixed small training set, the first examples in file order.
        kept = max(1, round(cfg.get("train_fraction", 1.0) * (total - n_heldout)))
        return Source(builder, f"train[:{kept}]" if kept < total else "train", label_map)
    names = list(builder.info.splits.keys())
    test = "test" if "test" in names or not names else "validation"  # no split names known: 'test'
    if cfg.get("test_examples", 0):  # a smoke test's share: the first N, before any class filter
        test = f"{test}[:{int(cfg.test_examples)}]"
    if split == "test":
        return Source(builder, test, label_map)
    if (parsed := shifts.parse(split)) is not None:
        return Source(builder, test, label_map, shift=parsed)
    src = natural_shifts.source(cfg.name, split)
    other = _builder(cfg, src.builder)
    if src.classes is not None:
        if classes is not None:
            raise InputError(f"split {split!r} is a 200-class subset; it can't be combined with classes=...")
        label_map = _label_map(_num_original_classes(other), src.classes)
    return Source(other, src.split, label_map)


# -------------------------------------------------------------------------------------- reading, counts


def _skip_image(builder) -> dict:
    key = tuple(builder.info.supervised_keys or ("image", "label"))[0]
    return {key: tfds.decode.SkipDecoding()}


def _shard(split: str, index: int, count: int):
    return split if count == 1 else tfds.even_splits(split, n=count)[index]


def _read(src: Source, split, first_index: int = 0) -> tf.data.Dataset:
    """(index in the split, encoded image, label int32), in file order, filtered and relabelled."""
    image_key, label_key = src.keys
    ds = src.builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_image(src.builder),
                                read_config=tfds.ReadConfig(try_autocache=False))
    ds = ds.enumerate(first_index).map(
        _graph(lambda i, ex: (i, ex[image_key], tf.cast(ex[label_key], tf.int32))))
    if src.label_map is not None:
        table = tf.constant(src.label_map)
        ds = ds.map(_graph(lambda i, im, y: (i, im, tf.gather(table, y))))
        ds = ds.filter(_graph(lambda index, image, label: label >= 0))
    return ds


_LABELS: dict = {}
_CARDINALITIES: dict = {}  # each count builds a TFDS dataset (~40 ms); a command asks for a few splits dozens of times


def _count(src: Source, split) -> int:
    """Number of examples of `split` that pass the label filter (one pass over the labels, remembered)."""
    if src.label_map is None:
        return _cardinality(src.builder, split)
    key = (str(src.builder.data_dir), src.builder.info.full_name, str(split))
    labels = _LABELS.get(key)
    if labels is None:
        kept = decoded_cache.path_for(src.builder.data_dir, key[1:], prefix=decoded_cache.LABELS_PREFIX)
        labels = decoded_cache.load_labels(kept)
        if labels is None:
            labels = records.labels(src.builder, split, src.keys)
            decoded_cache.save_labels(kept, labels)
        _LABELS[key] = labels
    return int((src.label_map[labels] >= 0).sum())


_ARRAYS: collections.OrderedDict = collections.OrderedDict()


def forget() -> None:
    """Drop what this process remembers of the data sets it read (labels, decoded splits), named by data
    set directory, builder and split: for data served under those names by something else (mocked)."""
    _LABELS.clear()
    _ARRAYS.clear()
    _CARDINALITIES.clear()


def _arrays(src: Source, split, shape, n: int, first_index: int = 0):
    """Decoded (images uint8 [n, h, w, c], labels int32 [n], index int64 [n]) of `split` (n examples).

    Memoised, least recently used dropped beyond IN_MEMORY_MAX_BYTES in all, and kept on disk beside
    the data set for the next process (decoded_cache).
    """
    key = (str(src.builder.data_dir), src.builder.info.full_name, str(split), n, first_index,
           None if src.label_map is None else src.label_map.tobytes())
    if key in _ARRAYS:
        _ARRAYS.move_to_end(key)
        return _ARRAYS[key]
    # The copy an earlier process kept, named by what the decoded arrays depend on (None where the data
    # set's directory cannot be listed).
    kept = decoded_cache.path_for(src.builder.data_dir, (
        src.builder.info.full_name, str(split), first_index,
        None if src.label_map is None else src.label_map.tolist(), list(shape)))
    arrays = decoded_cache.load(kept, n, shape)
    if arrays is None:
        arrays = _decode(src, split, shape, n, first_index)
        decoded_cache.save(kept, arrays)
    _ARRAYS[key] = arrays
    while sum(a[0].nbytes for a in _ARRAYS.values()) > IN_MEMORY_MAX_BYTES and len(_ARRAYS) > 1:
        _ARRAYS.popitem(last=False)
    return arrays


def _decode(src: Source, split, shape, n: int, first_index: int):
    """``_arrays``' work: read and decode the split."""
    def decode(index, image_bytes, labels):  # a batch at a time: map_fn beats a per-example map here
        images = tf.map_fn(lambda b: pp.decode(b, shape[-1]), image_bytes,
                           fn_output_signature=tf.TensorSpec([None, None, shape[-1]], tf.uint8))
        return tf.ensure_shape(images, [None, *shape]), labels, index

    ds = records.batches(src.builder, split, src.keys, first_index, src.label_map)  # None: read through TFDS
    ds = (ds if ds is not None else _read(src, split, first_index).batch(1024)).map(
        _graph(decode), num_parallel_calls=tf.data.AUTOTUNE)
    parts = list(ds.with_options(_options()).as_numpy_iterator())
    empty = (np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32), np.zeros((0,), np.int64))
    arrays = tuple(np.concatenate([p[k] for p in parts]) if parts else empty[k] for k in range(3))
    if len(arrays[1]) != n:
        raise RuntimeError(f"read {len(arrays[1])} examples from {split!r}, expected {n}")
    return arrays


def _static_shape(src: Source) -> tuple[int, int, int] | None:
    """The images' shape if they all have one known shape and are not JPEG."""
    feature = src.builder.info.features[src.keys[0]]
    shape = tuple(feature.shape)
    if _is_jpeg(src) or None in shape or len(shape) != 3:
        return None
    return shape


def _in_memory(cfg, src: Source, n: int) -> tuple[int, int, int] | None:
    """The static image shape if the split is served from decoded arrays in memory, else None."""
    shape = _static_shape(src)
    if cfg.cache and shape is not None and 0 < n * math.prod(shape) <= IN_MEMORY_MAX_BYTES:
        return shape
    return None


def _split_bytes(builder, split: str) -> int:
    """Size of a split's files on disk (0 if unknown, e.g. mocked)."""
    try:
        return int(builder.info.splits[split].num_bytes or 0)
    except (KeyError, ValueError, TypeError):
        return 0


def _is_jpeg(src: Source) -> bool:
    return getattr(src.builder.info.features[src.keys[0]], "encoding_format", None) == "jpeg"


def _source_channels(src: Source) -> int:
    return src.builder.info.features[src.keys[0]].shape[-1] or 3


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise InputError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    return global_batch_size // process_count


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


def _numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    yield from ds.prefetch(tf.data.AUTOTUNE).with_options(_options()).as_numpy_iterator()


# -------------------------------------------------------------------------------------------- pipelines


def _check_config(cfg) -> None:
    for field, valid in (("normalize", pp.NORMALIZATIONS), ("train_crop", pp.TRAIN_CROPS),
                         ("resize_method", pp.RESIZE_METHODS), ("eval_resize", pp.EVAL_RESIZES)):
        if cfg.get(field, valid[0]) not in valid:  # the fields added later default to their first choice
            raise InputError(f"unknown {field} {cfg.get(field)!r}; valid: {', '.join(valid)}")
    if cfg.channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {cfg.channels}")
    if not 0 < cfg.eval_crop_pct <= 1:
        raise InputError(f"eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct}")
    if cfg.aug_strength < 0 or cfg.mixup_alpha < 0:
        raise InputError("aug_strength and mixup_alpha must be >= 0")
    randaugment.settings(cfg)  # N >= 0, M one of its bins


def _finish(images: tf.Tensor, cfg) -> tf.Tensor:
    """A batch [b, H, W, c] in [0, 1] -> the model's channels, normalised, with its static shape."""
    images = pp.normalize(pp.set_channels(images, cfg.channels), cfg.normalize)
    return tf.ensure_shape(images, [None, cfg.image_size, cfg.image_size, cfg.channels])


def train_batches(cfg, global_batch_size: int, *, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    # Long: the two ways below (in memory, streaming) keep one contract and share the resume arithmetic.
    """Infinite, shuffled, augmented batches of this process's share of 'train'.

    Yields {'image': float32 [b, H, W, C], 'label': int32 [b], 'targets': float32 [b, num_classes]} with
    b = global_batch_size // jax.process_count(). The same seed gives the same batches, and start_step=s
    gives exactly the batches an uninterrupted iterator yields from its s-th (0-based) batch on.

    Two ways, one contract:
    * in memory (cfg.cache, and images of one static shape, not JPEG, at most IN_MEMORY_MAX_BYTES decoded:
      Fashion-MNIST, CIFAR): the shard is decoded once into memory; epoch e is a full random permutation
      (index_shuffle) seeded by (seed, e, process), and each batch is augmented at once with a key made of
      (seed, step, process). shuffle_buffer is not used. Resuming costs nothing.
    * streaming (otherwise, e.g. ImageNet): tf.data reads the shard in file order (its encoded records
      cached in memory if cfg.cache and they fit in IN_MEMORY_MAX_BYTES),
      epoch e is shuffled with a buffer seeded by (seed, process, e), and example g of the stream is
      augmented with a key made of (seed, g, process), decoding only the crop of a JPEG. Resuming skips
      whole epochs arithmetically and at most one epoch of raw, undecoded records.
    """
    _check_config(cfg)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    pi, pc = jax.process_index(), jax.process_count()
    local = _local_batch(global_batch_size, pc)
    src = resolve(cfg, "train")
    shard = _shard(src.tfds_split, pi, pc)
    n = _count(src, shard)
    if n == 0:
        raise ValueError(f"process {pi} has no training examples in {src.tfds_split!r}")
    ncls = num_classes(cfg)
    channels = _source_channels(src)
    size, strength, seed = cfg.image_size, float(cfg.aug_strength), int(seed)
    area_range, ratio_range = pp.crop_range(strength)
    pad, method = int(round(cfg.pad * strength)), cfg.get("resize_method", "bilinear")
    in_memory = _in_memory(cfg, src, n)
    ra_ops, ra_bin = randaugment.settings(cfg)  # after the crop and flip; its keys: SALT_RANDAUGMENT

    def augment_batch(key, images):  # uint8 [b, h, w, c] -> [b, size, size, c] on the uint8 scale
        k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        if cfg.train_crop == "random_resized":
            images = pp.batch_random_resized_crop(images, k_crop, size, area_range=area_range,
                                                  aspect_ratio_range=ratio_range, method=method)
        elif cfg.train_crop == "pad_crop":
            images = pp.batch_pad_crop(images, k_crop, size, pad, method)
        else:
            images = pp.resize(images, size, method)
        return pp.batch_flip(images, k_flip) if cfg.flip else images

    def augment_example(g, image_bytes, label):  # -> uint8 [size, size, c]
        key = pp.example_key(seed, pp.SALT_AUGMENT, g * pc + pi)
        k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        if cfg.train_crop == "random_resized":
            image = pp.random_resized_crop(image_bytes, k_crop, size, channels, area_range=area_range,
                                           aspect_ratio_range=ratio_range, jpeg=_is_jpeg(src), method=method)
        elif cfg.train_crop == "pad_crop":
            image = pp.pad_crop(pp.decode(image_bytes, channels), k_crop, size, pad, method)
        else:
            image = pp.resize(pp.decode(image_bytes, channels), size, method)
        image = tf.ensure_shape(pp.random_flip(image, k_flip) if cfg.flip else image, [size, size, channels])
        image = randaugment.randaugment(image, pp.example_key(seed, pp.SALT_RANDAUGMENT, g * pc + pi), ra_ops, ra_bin)
        return {"image": image, "label": label}

    def finish_batch(step, batch):
        images = batch["image"]
        if in_memory:
            images = augment_batch(pp.example_key(seed, pp.SALT_AUGMENT, step * pc + pi), images)
            images = randaugment.batch_randaugment(  # off (N = 0): the images as they are
                images, pp.example_key(seed, pp.SALT_RANDAUGMENT, step * pc + pi), ra_ops, ra_bin)
        batch = {"image": _finish(pp.to_unit(images), cfg), "label": batch["label"],
                 "targets": tf.one_hot(batch["label"], ncls, dtype=tf.float32)}
        if cfg.mixup_alpha > 0:
            batch = pp.mixup(batch, pp.example_key(seed, pp.SALT_MIXUP, step * pc + pi), cfg.mixup_alpha)
        return batch

    if in_memory:
        images, labels, _ = (tf.constant(a) for a in _arrays(src, shard, in_memory, n))

        def gather(step):  # epoch e is the permutation index_shuffle(., (seed, e * pc + pi, salt), n - 1)
            position = step * local + tf.range(local, dtype=tf.int64)
            # The raw op: tf.random.experimental.index_shuffle pads [local, 2] seeds along the wrong axis.
            epoch_seed = tf.stack([tf.fill([local], tf.constant(seed, tf.int64)), position // n * pc + pi,
                                   tf.fill([local], tf.constant(_SALT_SHUFFLE, tf.int64))], 1)
            idx = tf.raw_ops.RandomIndexShuffle(index=position % n, seed=epoch_seed,
                                                max_index=tf.constant(n - 1, tf.int64), rounds=4)
            return step, {"image": tf.gather(images, idx), "label": tf.gather(labels, idx)}

        ds = tf.data.Dataset.range(start_step, 2**62).map(_graph(gather))
    else:
        records = _read(src, shard).map(_graph(lambda i, im, y: (im, y)))
        if cfg.cache and _split_bytes(src.builder, "train") / pc <= IN_MEMORY_MAX_BYTES:
            records = records.cache()  # the encoded records, when they fit (not ImageNet's 140 GB)
        shuffle_base = tf.constant([seed, _SALT_SHUFFLE], tf.int64)

        def epoch(e):
            shuffle_seed = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(shuffle_base, pi), e)[0]
            ds = records.shuffle(max(1, min(int(cfg.shuffle_buffer), n)), seed=shuffle_seed)
            return ds.enumerate().map(_graph(lambda i, ex: (e * n + i, ex[0], ex[1])))

        first_epoch, skip = divmod(start_step * local, n)
        ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(_graph(epoch)).skip(skip)
        ds = ds.map(_graph(augment_example), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local, drop_remainder=True).enumerate(start_step)
    return _numpy(ds.map(_graph(finish_batch), num_parallel_calls=tf.data.AUTOTUNE))


def eval_batches(cfg, split: str, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Finite, deterministic, unaugmented batches of this process's shard of `split`, each example once.

    Yields {'image', 'label', 'mask'}; the last batch is padded to full size with zero images, label 0 and
    mask 0 (real examples have mask 1). Every process yields the same number of batches.
    """
    _check_config(cfg)
    pi, pc = jax.process_index(), jax.process_count()
    local = _local_batch(global_batch_size, pc)
    src = resolve(cfg, split)
    shards = [_shard(src.tfds_split, i, pc) for i in range(pc)]
    counts = [_count(src, s) for s in shards]
    n_batches = math.ceil(max(counts) / local)
    first_index = sum(_cardinality(src.builder, s) for s in shards[:pi])  # index in the unfiltered split
    size, channels, n, method = cfg.image_size, _source_channels(src), counts[pi], cfg.get("resize_method", "bilinear")
    crop_args = dict(size=size, crop_pct=cfg.eval_crop_pct, method=method, mode=cfg.get("eval_resize", "square"))
    in_memory = _in_memory(cfg, src, n)

    if in_memory:
        images, labels, index = (tf.constant(a) for a in _arrays(src, shards[pi], in_memory, n, first_index))

        def take(b):
            rows = b * local + tf.range(local, dtype=tf.int64)
            mask = rows < n
            rows = tf.minimum(rows, n - 1)
            return {"image": pp.center_crop(tf.gather(images, rows), **crop_args),
                    "label": tf.where(mask, tf.gather(labels, rows), 0), "index": tf.gather(index, rows),
                    "mask": tf.cast(mask, tf.float32)}

        ds = tf.data.Dataset.range(n_batches if n else 0).map(_graph(take), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def view(index, image_bytes, label):
            image = pp.center_crop(pp.decode(image_bytes, channels), **crop_args)
            return {"image": tf.ensure_shape(image, [size, size, channels]), "label": label, "index": index,
                    "mask": tf.constant(1.0)}

        padding = tf.data.Dataset.from_tensors({
            "image": tf.zeros([size, size, channels], tf.uint8), "label": tf.constant(0, tf.int32),
            "index": tf.constant(0, tf.int64), "mask": tf.constant(0.0)}).repeat()
        ds = _read(src, shards[pi], first_index).map(_graph(view), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.concatenate(padding).batch(local, drop_remainder=True)
    ds = ds.take(n_batches)  # every process yields the same number of batches

    def finish(batch):
        images = pp.to_unit(batch["image"])
        if src.shift is not None:
            images = shifts.apply(images, *src.shift, batch["index"])
        images = _finish(images, cfg) * batch["mask"][:, None, None, None]
        return {"image": images, "label": batch["label"], "mask": batch["mask"]}

    return _numpy(ds.map(_graph(finish), num_parallel_calls=tf.data.AUTOTUNE))


# ------------------------------------------------------------------------------------------ information


def check_available(cfg) -> None:
    """Refuse, before anything is trained or written, a data set that is not prepared in its data_dir.

    soupjax never downloads unless ``data.download`` is set: on a machine without network a missing
    data set must be named (with where TFDS looked) rather than end in a download attempt or an
    assertion deep in TFDS. The local Fashion-MNIST is prepared here from its local files, offline.
    """
    if cfg.name == fashion_mnist_local.NAME:
        try:
            fashion_mnist_local.prepare(cfg.data_dir)
        except FileNotFoundError as e:
            raise InputError(str(e)) from e
        return
    builder = _builder(cfg, cfg.name)
    if not builder.is_prepared():
        root = cfg.data_dir or os.fspath(builder.data_dir_root)
        raise InputError(
            f"data set {cfg.name!r} is not prepared in data_dir {root} (TFDS looked for {builder.data_dir}), "
            f"and soupjax does not download data sets: prepare it there first (`tfds build {cfg.name} "
            f"--data_dir {root}` where there is network access, or copy it in), or set data.download=True")


def check_heldout(cfg) -> None:
    """Refuse a held-out split that is empty, or leaves no training examples, with the numbers.

    Fine-tuning needs one: an ingredient's held-out accuracy is what greedy and learned soups rank and
    weigh by. It is carved from the training split by position (``train[n:]`` against ``train[:n]``),
    so it cannot overlap the fine-tuning examples; what remains to check is that both parts hold
    examples of the classes the config keeps.
    """
    if not cfg.heldout:
        raise InputError(f"data.heldout={_shown(cfg.heldout)}: fine-tuning needs a held-out split, carved from "
                         f"{cfg.name}'s training split (a fraction in (0, 1) or a count of examples), for the "
                         "held-out accuracy that soups rank ingredients by")
    total = _cardinality(_builder(cfg, cfg.name), "train")
    _heldout_count(cfg, total)  # refuses a count that takes the whole split, with the numbers
    for split in ("heldout", "train"):
        if num_examples(cfg, split) == 0:
            raise InputError(f"data.heldout={_shown(cfg.heldout)} of {total} training examples leaves no {split} "
                             f"examples of data.classes={list(cfg.classes)}")


def _shown(heldout) -> str:
    """A held-out size as the user wrote it: the field is a float, a count reads as a whole number."""
    return str(int(heldout)) if heldout is not None and float(heldout).is_integer() else repr(heldout)


def num_classes(cfg) -> int:
    """Number of classes the model predicts (after the `classes` filter)."""
    if cfg.classes is not None:
        return len(cfg.classes)
    return _num_original_classes(_builder(cfg, cfg.name))


def num_examples(cfg, split: str) -> int:
    """Number of real examples in `split`, over all processes (after the `classes` filter)."""
    src = resolve(cfg, split)
    return _count(src, src.tfds_split)


def shift_splits(cfg) -> list[str]:
    """The shift splits to report: cfg.shifts, or by default four corruptions at severity 3 plus the
    natural shift sets of the data set."""
    names = cfg.shifts
    if isinstance(names, str):
        if names == "default":
            return [shifts.PREFIX + s for s in shifts.DEFAULT] + natural_shifts.default_splits(cfg.name)
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    for name in names:
        _check_split(cfg, name)
    return names


def logit_projection(cfg, split: str) -> np.ndarray | None:
    """For ImageNet-R / ImageNet-A: the sorted indices of their 200 ImageNet classes; evaluate
    logits[:, idx] against the labels `eval_batches` yields (0..199). None for every other split."""
    _check_split(cfg, split)
    return natural_shifts.projection(cfg.name, split)
