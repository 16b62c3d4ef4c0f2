"""Shared fixtures: CPU only, and the real Fashion-MNIST prepared once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fashion_mnist_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the real Fashion-MNIST (Debian's files), prepared once per session."""
    from soupjax.data import fashion_mnist_local
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    fashion_mnist_local.prepare(data_dir=data_dir)
    return data_dir
