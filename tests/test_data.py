"""soupjax.data: the local Fashion-MNIST builder, splits, deterministic/resumable pipelines, shifts, mocks."""
from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from soupjax import data
from soupjax.cli.errors import InputError
from soupjax.data import fashion_mnist_local, natural_shifts, shifts


@pytest.fixture
def cfg(fashion_mnist_data_dir):
    c = data.default_data_config()
    c.data_dir = fashion_mnist_data_dir
    return c


@pytest.fixture
def small(cfg):
    """Fashion-MNIST with a 100-example fine-tuning part (the rest held out) and raw pixels out."""
    cfg.heldout = 59_900
    cfg.image_size, cfg.channels, cfg.normalize = 28, 1, "unit"
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def hashes(batches) -> list[bytes]:
    """One key per real example: its image on the uint8 scale and its label, as bytes."""
    out = []
    for b in batches:
        real = b["mask"] > 0 if "mask" in b else np.ones(len(b["label"]), bool)
        images = np.round(b["image"][real] * 255).astype(np.uint8).reshape(int(real.sum()), -1)
        out += [im.tobytes() + bytes([y]) for im, y in zip(images, b["label"][real] % 256)]
    return out


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------ real data


def test_real_fashion_mnist_sizes_and_classes(fashion_mnist_data_dir, cfg):
    builder = fashion_mnist_local.prepare(fashion_mnist_data_dir)
    assert builder.info.features["image"].shape == (28, 28, 1)
    assert builder.info.features["label"].names == list(fashion_mnist_local.CLASS_NAMES)
    for split, total in [("train", 60_000), ("test", 10_000)]:
        labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                  decoders={"image": tfds.decode.SkipDecoding()}))["label"]
        assert len(labels) == total
        assert np.bincount(labels, minlength=10).tolist() == [total // 10] * 10
    assert data.num_classes(cfg) == 10
    assert data.num_examples(cfg, "train") == 54_000 and data.num_examples(cfg, "heldout") == 6_000
    assert data.num_examples(cfg, "test") == 10_000


@pytest.mark.slow
def test_heldout_sizes_and_disjoint_from_train(small):
    small.heldout = 0.25
    assert (data.num_examples(small, "train"), data.num_examples(small, "heldout")) == (45_000, 15_000)
    small.heldout = 59_900  # an int count (stored as float by the ConfigDict)
    assert (data.num_examples(small, "train"), data.num_examples(small, "heldout")) == (100, 59_900)
    train = hashes(data.eval_batches(small, "train", 50))
    heldout = hashes(data.eval_batches(small, "heldout", 1000))
    assert len(set(train)) == 100 and len(set(heldout)) == 59_900
    assert not set(train) & set(heldout)
    with pytest.raises(ValueError, match="heldout"):
        small.heldout = 60_000
        data.num_examples(small, "train")


def test_train_fraction_keeps_the_first_training_examples_and_the_same_heldout(small):
    """A small fine-tuning set (configs/fashion_mnist_vit.py:regime=small_data): the first examples of the
    training part, the same for every run; the held-out tail unchanged; the evaluation fingerprint too."""
    from soupjax.config.base import check_config, eval_fingerprint
    small.heldout = 59_800
    everything, heldout = hashes(data.eval_batches(small, "train", 50)), hashes(data.eval_batches(small, "heldout", 1000))
    before = eval_fingerprint(small)
    small.train_fraction = 0.1
    assert data.num_examples(small, "train") == 20
    assert hashes(data.eval_batches(small, "train", 50)) == everything[:20]
    assert hashes(data.eval_batches(small, "heldout", 1000)) == heldout
    assert eval_fingerprint(small) == before  # the logits of every evaluated split still serve
    small.aug_strength, small.flip = 0.0, False  # raw images: training draws only from those 20
    batch = next(data.train_batches(small, 40, seed=0))
    assert set(hashes([batch])) == set(everything[:20])
    config = ml_collections.ConfigDict({"data": small})
    for bad in (0.0, 1.5):
        config.data.train_fraction = bad
        with pytest.raises(InputError, match="train_fraction"):
            check_config(config)


def test_test_examples_keeps_the_first_of_the_test_split_and_its_shifts(small):
    """``data.test_examples`` (the ``testing`` variants' smoke-test share): the first N test images, and
    the shifts made of exactly those; another evaluation fingerprint; the held-out split untouched."""
    from soupjax.config.base import eval_fingerprint
    whole, before = hashes(data.eval_batches(small, "test", 1000)), eval_fingerprint(small)
    noisy = hashes(data.eval_batches(small, "shift/gaussian_noise-2", 1000))
    small.test_examples = 300
    assert data.num_examples(small, "test") == 300
    assert hashes(data.eval_batches(small, "test", 128)) == whole[:300]
    assert hashes(data.eval_batches(small, "shift/gaussian_noise-2", 128)) == noisy[:300]  # keyed by index
    assert data.num_examples(small, "heldout") == 59_900 and eval_fingerprint(small) != before


def test_classes_filter_relabels(small):
    small.classes = [7, 2, 9]
    assert data.num_classes(small) == 3
    assert data.num_examples(small, "test") == 3_000
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in data.eval_batches(small, "test", 1024)])
    assert np.bincount(labels).tolist() == [1000, 1000, 1000]
    # New label i is original class classes[i]: the same images, in the same order.
    filtered = hashes(data.eval_batches(small, "train", 64))
    small.classes = None
    kept = {7: 0, 2: 1, 9: 2}
    unfiltered = hashes(data.eval_batches(small, "train", 64))
    original = [h[:-1] + bytes([kept[h[-1]]]) for h in unfiltered if h[-1] in kept]
    assert filtered == original and 20 < len(filtered) < 40
    small.classes = [7, 2, 9]
    batch = next(data.train_batches(small, 32, seed=0))
    assert batch["targets"].shape == (32, 3) and set(batch["label"]) <= {0, 1, 2}


# ---------------------------------------------------------------------------------- training batches


@pytest.mark.parametrize("cache", [True, False], ids=["in_memory", "streaming"])
def test_train_batches_deterministic_and_resumable(small, cache):
    small.cache = cache
    small.image_size, small.channels, small.normalize = 32, 3, "inception"  # augmentation on
    straight = take(data.train_batches(small, 32, seed=3), 9)  # 100 examples: crosses 2 epochs
    assert_same(straight, take(data.train_batches(small, 32, seed=3), 9))
    for s in (3, 7):
        assert_same(straight[s:], take(data.train_batches(small, 32, seed=3, start_step=s), 9 - s))
    other = next(data.train_batches(small, 32, seed=4))
    assert not np.array_equal(other["image"], straight[0]["image"])
    b = straight[0]
    assert b["image"].shape == (32, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["targets"].dtype == np.float32
    np.testing.assert_array_equal(b["targets"], np.eye(10, dtype=np.float32)[b["label"]])
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])  # grayscale tiled
    # Every example once per epoch: the first 3 batches (96 of 100) hold distinct examples.
    small.aug_strength, small.flip, small.image_size, small.channels, small.normalize = 0.0, False, 28, 1, "unit"
    epoch = take(data.train_batches(small, 32, seed=3), 3)
    assert len(set(hashes(epoch))) == 96
    assert set(hashes(epoch)) <= set(hashes(data.eval_batches(small, "train", 100)))


@pytest.mark.parametrize("crop,cache", [("random_resized", True), ("random_resized", False), ("resize", True)])
def test_train_crops_channels_and_normalisations(small, crop, cache):
    small.train_crop, small.cache = crop, cache
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for channels, normalize, to_unit in [(1, "unit", lambda x: x), (3, "inception", lambda x: (x + 1) / 2),
                                         (3, "imagenet", lambda x: x * std + mean)]:
        small.channels, small.normalize = channels, normalize
        image = next(data.train_batches(small, 16, seed=0))["image"]
        assert image.shape == (16, 28, 28, channels)
        # Undoing the documented normalisation gives pixels in [0, 1]: Fashion-MNIST's black background
        # at exactly 0 in every channel, and the grayscale image the same in each (per-channel constants).
        unit = to_unit(image.astype(np.float64))
        np.testing.assert_allclose(unit.min(axis=(0, 1, 2)), 0.0, atol=1e-5, err_msg=normalize)
        assert 0.5 < unit.max() <= 1.0 + 1e-5, (normalize, unit.max())
        np.testing.assert_allclose(unit, np.repeat(unit[..., :1], channels, -1), atol=1e-5, err_msg=normalize)


def test_mixup_targets_sum_to_one(small):
    small.mixup_alpha = 0.4
    b = take(data.train_batches(small, 32, seed=0), 2)[1]
    np.testing.assert_allclose(b["targets"].sum(axis=1), 1.0, rtol=1e-6)
    assert ((b["targets"] > 0) & (b["targets"] < 1)).any()


# -------------------------------------------------------------------------------------- eval batches


def test_eval_batches_cover_every_example_once_with_padding(small):
    batches = list(data.eval_batches(small, "train", 32))
    assert len(batches) == 4 and all(b["image"].shape == (32, 28, 28, 1) for b in batches)
    assert {k: v.dtype for k, v in batches[0].items()} == {"image": np.float32, "label": np.int32,
                                                             "mask": np.float32}
    np.testing.assert_array_equal(batches[-1]["mask"], [1.0] * 4 + [0.0] * 28)
    assert not batches[-1]["image"][4:].any()
    got = hashes(batches)
    builder = fashion_mnist_local.prepare(small.data_dir)
    raw = tfds.as_numpy(builder.as_dataset(split="train[:100]", batch_size=-1))
    expected = [im.tobytes() + bytes([y]) for im, y in zip(raw["image"], raw["label"])]
    assert got == expected  # in order, each once
    assert sum(b["mask"].sum() for b in data.eval_batches(small, "test", 3000)) == 10_000
    small.cache = False  # the streaming reader gives the same batches
    assert_same(batches, list(data.eval_batches(small, "train", 32)))


# -------------------------------------------------------------------------------------------- shifts


def test_shift_splits_deterministic_and_stronger_with_severity(small):
    clean = next(data.eval_batches(small, "test", 128))
    first = next(data.eval_batches(small, "shift/gaussian_noise-3", 128))
    assert_same([first], [next(data.eval_batches(small, "shift/gaussian_noise-3", 128))])
    # Keyed by example index: the same noise whatever the batch size.
    half = next(data.eval_batches(small, "shift/gaussian_noise-3", 64))
    np.testing.assert_array_equal(first["image"][:64], half["image"])
    assert not np.array_equal(first["image"], clean["image"])
    images = tf.constant(clean["image"])  # 'unit' normalisation: [0, 1] pixels
    index = tf.range(128, dtype=tf.int64)
    for corruption in shifts.CORRUPTIONS:
        diffs = [float(tf.reduce_mean(tf.abs(shifts.apply(images, corruption, s, index) - images)))
                 for s in shifts.SEVERITIES]
        assert 0 < diffs[0] and all(a < b for a, b in zip(diffs, diffs[1:])), (corruption, diffs)


def test_shift_split_names(cfg):
    assert data.shift_splits(cfg) == ["shift/gaussian_noise-3", "shift/gaussian_blur-3", "shift/contrast-3",
                                      "shift/rotate-3"]
    cfg.shifts = ["shift/rotate-5", "test"]
    assert data.shift_splits(cfg) == ["shift/rotate-5", "test"]
    cfg.shifts = "shift/contrast-1, shift/pixelate-2"
    assert data.shift_splits(cfg) == ["shift/contrast-1", "shift/pixelate-2"]
    cfg.name = "imagenet2012"
    cfg.shifts = "default"
    assert data.shift_splits(cfg)[4:] == ["imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a"]
    idx_r, idx_a = data.logit_projection(cfg, "imagenet_r"), data.logit_projection(cfg, "imagenet_a")
    for idx in (idx_r, idx_a):
        assert idx.shape == (200,) and np.all(np.diff(idx) > 0) and idx.max() < 1000
    assert not np.array_equal(idx_r, idx_a)
    assert data.logit_projection(cfg, "imagenet_v2") is None and data.logit_projection(cfg, "test") is None
    cfg.name = "cifar10"
    assert "cifar10_1" in data.shift_splits(cfg)
    assert data.logit_projection(cfg, "cifar10_corrupted/fog_3") is None


# --------------------------------------------------------------------------------- other data sets


def test_cifar10_end_to_end_under_mock_data(tmp_path):
    c = data.default_data_config()
    c.update(name="cifar10", data_dir=str(tmp_path), heldout=8, train_crop="random_resized", mixup_alpha=0.2)
    with tfds.testing.mock_data(num_examples=40):
        assert data.num_classes(c) == 10
        batch = next(data.train_batches(c, 16, seed=0, start_step=5))
        assert batch["image"].shape == (16, 32, 32, 3) and batch["targets"].shape == (16, 10)
        for split in ["test", "heldout", "cifar10_1", "cifar10_corrupted/gaussian_noise_2", "shift/contrast-2"]:
            batches = list(data.eval_batches(c, split, 16))
            assert sum(b["mask"].sum() for b in batches) == data.num_examples(c, split) == 40, split


def test_imagenet_streaming_jpeg_path_and_200_class_sets_under_mock_data(tmp_path):
    c = data.default_data_config()
    c.update(name="imagenet2012", data_dir=str(tmp_path), heldout=0.25, image_size=32,
             train_crop="random_resized", normalize="imagenet", eval_crop_pct=0.875)
    with tfds.testing.mock_data(num_examples=24):
        assert data.num_classes(c) == 1000
        a, b = take(data.train_batches(c, 8, seed=0), 2), take(data.train_batches(c, 8, seed=0, start_step=1), 1)
        assert_same(a[1:], b)
        assert next(data.eval_batches(c, "test", 8))["image"].shape == (8, 32, 32, 3)
        labels = np.concatenate([b["label"][b["mask"] > 0] for b in data.eval_batches(c, "imagenet_r", 8)])
        assert len(labels) == data.num_examples(c, "imagenet_r") and np.all((labels >= 0) & (labels < 200))


# ---------------------------------------------------------------------------------------- processes


def test_each_process_reads_its_own_shard(small, monkeypatch):
    small.aug_strength, small.flip = 0.0, False  # raw pixels, to compare the shards
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    seen_train, seen_eval = [], []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        batches = take(data.train_batches(small, 20, seed=0), 5)  # 50 examples each: one epoch
        assert all(b["image"].shape[0] == 10 for b in batches)
        seen_train.append(set(hashes(batches)))
        seen_eval.append(list(data.eval_batches(small, "train", 16)))
    assert len(seen_train[0]) == len(seen_train[1]) == 50 and not seen_train[0] & seen_train[1]
    assert len(seen_eval[0]) == len(seen_eval[1]) == 7  # 50 examples, 8 a batch per process
    ev = [set(hashes(b)) for b in seen_eval]
    assert len(ev[0]) == len(ev[1]) == 50 and not ev[0] & ev[1]
    assert ev[0] | ev[1] == seen_train[0] | seen_train[1]
    with pytest.raises(ValueError, match="multiple of the process count"):
        next(data.train_batches(small, 21, seed=0))


# -------------------------------------------------------------------------------------------- errors


def test_clear_errors(cfg, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*heldout.*shift/<corruption>-<severity>"):
        data.num_examples(cfg, "tset")
    with pytest.raises(ValueError, match="unknown split 'imagenet_r'"):
        data.logit_projection(cfg, "imagenet_r")  # not a Fashion-MNIST split
    cfg.name = "no_such_dataset"
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        data.num_classes(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist_local.prepare(str(tmp_path / "tfds"), manual_dir=str(empty))
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and str(empty) in str(e.value)
    monkeypatch.setenv(fashion_mnist_local.ENV_MANUAL_DIR, str(empty))
    cfg.name, cfg.data_dir = "fashion_mnist_local", str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.num_classes(cfg)


def test_natural_shift_tables():
    for classes in (natural_shifts.IMAGENET_R_CLASSES, natural_shifts.IMAGENET_A_CLASSES):
        assert len(classes) == len(set(classes)) == 200 and list(classes) == sorted(classes)
    assert natural_shifts.source("cifar10", "cifar10_corrupted/fog_6") is None
    assert natural_shifts.source("cifar10", "cifar10_corrupted/fog_5").builder == "cifar10_corrupted/fog_5"


def test_decoded_splits_are_kept_on_disk_for_the_next_process(fashion_mnist_data_dir, tmp_path, monkeypatch):
    """A split decoded once is read back by later processes (no decoding), identical; a damaged file is
    decoded again and replaced; a data set prepared again (its directory changed) is decoded again."""
    import shutil
    from soupjax.data import decoded_cache, pipeline
    data_dir = tmp_path / "tfds"  # a copy: this test changes the data set's directory
    shutil.copytree(fashion_mnist_data_dir, data_dir, ignore=shutil.ignore_patterns(decoded_cache.SUBDIRECTORY))
    version_dir = pipeline.fashion_mnist_local.prepare(str(data_dir)).data_dir
    c = data.default_data_config()
    c.data_dir, c.classes = str(data_dir), [1, 3]
    decoded = []  # a split is offered to the cache after it was decoded, and only then
    real_save = decoded_cache.save
    monkeypatch.setattr(decoded_cache, "save", lambda path, arrays: decoded.append("test") or real_save(path, arrays))

    def read():  # as a new process would: nothing decoded in memory yet
        pipeline.forget()
        return list(data.eval_batches(c, "test", 1000))

    def kept_splits() -> list[Path]:
        return sorted(p for p in (Path(version_dir) / decoded_cache.SUBDIRECTORY).glob("*.npz")
                      if not p.name.startswith(decoded_cache.LABELS_PREFIX))

    first = read()
    assert decoded == ["test"] and sum(b["mask"].sum() for b in first) == 2000
    kept = kept_splits()
    assert len(kept) == 1
    # The labels of the whole split, which the class filter is counted from, are kept too.
    labels = list((Path(version_dir) / decoded_cache.SUBDIRECTORY).glob(f"{decoded_cache.LABELS_PREFIX}*.npz"))
    assert len(labels) == 1 and np.isin(decoded_cache.load_labels(labels[0]), [1, 3]).sum() == 2000
    monkeypatch.setattr(pipeline, "_skip_image", lambda _: pytest.fail("counted from the records again"))
    assert_same(read(), first)
    monkeypatch.undo()
    monkeypatch.setattr(decoded_cache, "save", lambda path, arrays: decoded.append("test") or real_save(path, arrays))
    assert decoded == ["test"], "read back from disk, not decoded again"

    kept[0].write_bytes(b"not an npz file")
    assert_same(read(), first)
    assert decoded == ["test", "test"]
    with np.load(kept[0]) as saved:  # replaced by a good one
        assert len(saved["labels"]) == 2000

    (Path(version_dir) / "touched").write_text("the data set prepared again")
    assert_same(read(), first)
    assert decoded == ["test", "test", "test"]

    # Another class filter is another file; a file is only taken for the shape and size it holds.
    c.classes = None
    everything = read()
    assert decoded == ["test"] * 4 and sum(b["mask"].sum() for b in everything) == 10_000
    kept = kept_splits()
    assert len(kept) == 3  # the first, unusable since the data set changed, and one per filter now
    what = (pipeline.fashion_mnist_local.prepare(str(data_dir)).info.full_name, "test", 0, None, [28, 28, 1])
    path = decoded_cache.path_for(version_dir, what)
    images, labels, index = decoded_cache.load(path, 10_000, (28, 28, 1))
    np.testing.assert_array_equal(index, np.arange(10_000))
    assert decoded_cache.load(path, 9_999, (28, 28, 1)) is None
    assert decoded_cache.load(path, 10_000, (28, 28, 3)) is None
    # Switched off: nothing read back (the split is decoded again) and nothing written.
    written = sorted((Path(version_dir) / decoded_cache.SUBDIRECTORY).glob("*.npz"))
    monkeypatch.setenv(decoded_cache.ENABLE_VARIABLE, "0")
    assert_same(read(), everything)
    assert decoded == ["test"] * 5
    assert sorted((Path(version_dir) / decoded_cache.SUBDIRECTORY).glob("*.npz")) == written


def test_a_command_starts_tensorflow_without_keras_or_autograph(fashion_mnist_data_dir, tmp_path):
    """The start-up a command line pays for TensorFlow: no Keras import (soupjax.cli.startup) and no
    AutoGraph rewriting of the functions given to tf.data (it writes each rewritten function to a
    temporary file, removed at exit; none may appear) while training and evaluation batches are built."""
    import os
    import subprocess
    import sys
    program = f"""
import sys
from soupjax.cli.startup import prepare_process
prepare_process()
from soupjax import data
cfg = data.default_data_config()
cfg.data_dir, cfg.heldout, cfg.randaugment_ops, cfg.mixup_alpha = {fashion_mnist_data_dir!r}, 0.5, 2, 0.2
next(data.train_batches(cfg, 8, seed=0)); next(data.eval_batches(cfg, "shift/gaussian_noise-2", 8))
import os, tempfile
print("keras" in sys.modules, sum("autograph" in name for name in os.listdir(tempfile.gettempdir())))
"""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("TF_USE_LEGACY_KERAS", None)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "0"], out.stdout
