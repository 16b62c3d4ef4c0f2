"""Fashion-MNIST as a TFDS builder that reads local files and never touches the network.

Debian ships the real data set in `dataset-fashion-mnist`:
`/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`. This builder reads
those four gzip'd IDX files from its manual dir and writes an ordinary TFDS data set (train 60,000 /
test 10,000; `image` 28x28x1 uint8, `label` with the 10 Fashion-MNIST names), so the same tf.data
pipeline serves it and any other TFDS image-classification set.

The manual dir is, first found: the `manual_dir` argument of `prepare()`, the environment variable
`SOUPJAX_FASHION_MNIST_DIR`, `/usr/share/datasets/fashion-mnist`. Importing this module registers the
builder as `fashion_mnist_local`; `soupjax.data` prepares it on first use (a few seconds).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

NAME = "fashion_mnist_local"
DEFAULT_MANUAL_DIR = "/usr/share/datasets/fashion-mnist"
ENV_MANUAL_DIR = "SOUPJAX_FASHION_MNIST_DIR"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
_FILES = {  # split -> (images, labels, number of examples)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}


def resolve_manual_dir(manual_dir: str | os.PathLike | None = None) -> str:
    """The folder the IDX files are read from (argument, then $SOUPJAX_FASHION_MNIST_DIR, then Debian's)."""
    return os.fspath(manual_dir or os.environ.get(ENV_MANUAL_DIR) or DEFAULT_MANUAL_DIR)


def check_files(manual_dir: str) -> None:
    """Raises FileNotFoundError naming the folder, the missing files and the Debian package."""
    expected = [f for images, labels, _ in _FILES.values() for f in (images, labels)]
    missing = [f for f in expected if not os.path.isfile(os.path.join(manual_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {manual_dir!r}: missing {', '.join(missing)}. "
            f"Install them with `apt-get install dataset-fashion-mnist` (it puts them in "
            f"{DEFAULT_MANUAL_DIR}), or point ${ENV_MANUAL_DIR} at a folder that holds them.")


def _read_idx(path: str, count: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Reads a gzip'd IDX file of uint8 (magic 0x0801 labels, 0x0803 images)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if data[2] != 0x08 or dims != (count, *item_shape):
        raise ValueError(f"{path}: expected uint8 IDX data of shape {(count, *item_shape)}, got {dims}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _png(image: np.ndarray) -> bytes:
    """Encodes a [H, W, 1] uint8 image as an uncompressed grayscale PNG.

    TFDS's own encoder runs a TF graph per image (~20 s for the 70,000); stored deflate blocks make
    preparation take seconds, and 60 MB on disk instead of 35.
    """
    h, w = image.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w)], axis=1)  # filter byte 0
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)) + chunk(b"IEND", b""))


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files (Debian's `dataset-fashion-mnist`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fashion-MNIST read from local gzip'd IDX files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"`apt-get install dataset-fashion-mnist` puts the four .gz files in {DEFAULT_MANUAL_DIR}; "
        f"or set ${ENV_MANUAL_DIR} to a folder with {', '.join(f for v in _FILES.values() for f in v[:2])}.")
    # No downloads, so no checksums file to look for next to the code. (Finding the code's folder needs the
    # `importlib_resources` package, which TFDS does not declare as a dependency.)
    code_path = None

    def __init__(self, *, manual_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        self._manual_dir = resolve_manual_dir(manual_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Fashion-MNIST (Xiao et al. 2017), 28x28 grayscale images of 10 kinds of clothing.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # its manual_dir property asserts in its own words; we say which package to install
        manual_dir = self._manual_dir
        check_files(manual_dir)
        return {split: self._generate_examples(os.path.join(manual_dir, images),
                                               os.path.join(manual_dir, labels), count)
                for split, (images, labels, count) in _FILES.items()}

    def _generate_examples(self, images_path, labels_path, count):
        images = _read_idx(images_path, count, (28, 28))[..., None]
        labels = _read_idx(labels_path, count, ())
        for i in range(count):
            yield i, {"image": _png(images[i]), "label": int(labels[i])}


def prepare(data_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the builder, preparing it offline from `manual_dir` first if it isn't prepared yet.

    Under `tfds.testing.mock_data` preparation is a no-op, so mocked runs need no files.
    """
    builder = tfds.builder(NAME, data_dir=data_dir, manual_dir=manual_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder
