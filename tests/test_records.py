"""soupjax.data.records reads a split's records straight from its TFRecord file, a batch at a time: the same
records, in the same order, as TFDS's own reader, on the real Fashion-MNIST; and TFDS reads where that
order is not TFDS's beyond doubt."""
from __future__ import annotations

import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from soupjax.data import fashion_mnist_local, records

KEYS = ("image", "label")


def tfds_records(builder, split, first_index: int = 0, label_map=None):
    """(index, encoded image, label) as TFDS's own reader serves them, relabelled and filtered here."""
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(try_autocache=False))
    rows = [(first_index + i, ex["image"], int(ex["label"])) for i, ex in enumerate(ds.as_numpy_iterator())]
    if label_map is not None:
        rows = [(i, image, int(label_map[label])) for i, image, label in rows if label_map[label] >= 0]
    return rows


def read(builder, split, first_index: int = 0, label_map=None):
    ds = records.batches(builder, split, KEYS, first_index, label_map)
    assert ds is not None, split
    rows = []
    for index, images, labels in ds.as_numpy_iterator():
        assert len(index) <= 1024 and index.dtype == np.int64 and labels.dtype == np.int32
        rows += list(zip(index.tolist(), images, labels.tolist()))
    return rows


@pytest.fixture(scope="module")
def builder(fashion_mnist_data_dir):
    return fashion_mnist_local.prepare(fashion_mnist_data_dir)


@pytest.mark.parametrize("split, first_index, classes", [
    ("train[58900:]", 0, None),                        # the held-out tail, across a batch boundary
    (tfds.even_splits("test[:1000]", n=2)[1], 500, None),  # one process's share of a smoke test's split
    ("train[:2500]", 0, (5, 6, 7, 8, 9)),             # a class filter drops records inside batches
])
def test_the_same_records_in_the_same_order_as_tfds(builder, split, first_index, classes):
    label_map = None
    if classes is not None:
        label_map = np.full([10], -1, np.int32)
        label_map[list(classes)] = np.arange(len(classes))
    got, want = read(builder, split, first_index, label_map), tfds_records(builder, split, first_index, label_map)
    assert len(got) == len(want) > 0
    for (i, image, label), (j, want_image, want_label) in zip(got, want):
        assert (i, label) == (j, want_label) and image == want_image, (split, i, j)


def test_a_batch_the_class_filter_empties_is_not_yielded(builder):
    first = {label for _, _, label in tfds_records(builder, "train[:20]")}
    absent = min(set(range(10)) - first)
    label_map = np.full([10], -1, np.int32)
    label_map[absent] = 0
    assert list(records.batches(builder, "train[:20]", KEYS, 0, label_map).as_numpy_iterator()) == []
    label_map[sorted(first)[0]] = 1  # one class that is there: one batch, of its records only
    (batch,) = records.batches(builder, "train[:20]", KEYS, 0, label_map).as_numpy_iterator()
    assert len(batch[0]) > 0 and set(batch[2].tolist()) == {1}


def test_labels_of_a_slice_and_of_a_whole_split(builder):
    for split in ("train[59000:]", "test"):
        want = np.array([label for _, _, label in tfds_records(builder, split)], np.int32)
        got = records.labels(builder, split, KEYS)
        assert got.dtype == np.int32 and np.array_equal(got, want), split


def _builder_with(instructions, serialized_info=None):
    """What records reads of a builder: its split's file instructions and its features' stored form."""
    info = serialized_info or {"image": tfds.features.TensorInfo(shape=(), dtype=tf.string),
                               "label": tfds.features.TensorInfo(shape=(), dtype=tf.int64)}
    features = types.SimpleNamespace(get_serialized_info=lambda: info)
    splits = {"train": types.SimpleNamespace(file_instructions=instructions)}
    return types.SimpleNamespace(info=types.SimpleNamespace(splits=splits, features=features))


def test_tfds_reads_what_is_not_one_listed_file_of_an_image_and_a_label(builder, tmp_path):
    (real,) = builder.info.splits["train[:10]"].file_instructions
    assert records.file_of(_builder_with([real]), "train") == real
    assert records.batches(_builder_with([real]), "train", KEYS) is not None
    # Several files: TFDS interleaves them, so their order is TFDS's to give.
    assert records.file_of(_builder_with([real, real]), "train") is None
    # A file TFDS lists that is not there, and a split TFDS does not know.
    gone = types.SimpleNamespace(filename=str(tmp_path / "gone.tfrecord"), skip=0, take=10)
    assert records.file_of(_builder_with([gone]), "train") is None
    assert records.file_of(_builder_with([real]), "validation") is None
    # An image stored otherwise than as encoded bytes (a tensor feature), or a label that is a string.
    tensor_image = {"image": tfds.features.TensorInfo(shape=(28, 28, 1), dtype=tf.uint8),
                    "label": tfds.features.TensorInfo(shape=(), dtype=tf.int64)}
    assert records.batches(_builder_with([real], tensor_image), "train", KEYS) is None
    text_label = {"image": tfds.features.TensorInfo(shape=(), dtype=tf.string),
                  "label": tfds.features.TensorInfo(shape=(), dtype=tf.string)}
    assert records.batches(_builder_with([real], text_label), "train", KEYS) is None


def test_under_mock_data_tfds_serves_the_records(builder, fashion_mnist_data_dir):
    """The real files are there, but under mock data TFDS serves made-up examples: nothing is read from
    the files (tests/conftest.py's mock_data), and the labels are the mocked ones."""
    with tfds.testing.mock_data(num_examples=8):
        mocked = fashion_mnist_local.prepare(fashion_mnist_data_dir)
        assert records.file_of(mocked, "train") is None
        assert records.batches(mocked, "train", KEYS) is None
        assert len(records.labels(mocked, "train", KEYS)) == 8
