"""Shared fixtures: CPU only, and the real Fashion-MNIST prepared once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# The importer parity tests import timm, whose torchvision pulls in triton. Loading triton after
# TensorFlow's libraries segfaults the process (seen with tensorflow-cpu 2.21 and triton 3.8), so when
# the test extras are installed, triton is loaded first in every test process.
try:
    import triton  # noqa: F401,E402
except ImportError:
    pass


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache per test process: the trainer tests compile the same programs many times."""
    from soupjax.workdirs import enable_compilation_cache
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    enable_compilation_cache(directory)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory  # for the subprocesses the CLI tests start
    return directory


@pytest.fixture(scope="session")
def fashion_mnist_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the real Fashion-MNIST (Debian's files), prepared once per session."""
    from soupjax.data import fashion_mnist_local
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    fashion_mnist_local.prepare(data_dir=data_dir)
    return data_dir


@pytest.fixture(scope="session")
def finetuned_workdir(tmp_path_factory, fashion_mnist_data_dir, compilation_cache):
    """``python -m soupjax.finetune --config configs/fashion_mnist_vit.py:testing,sweep=2`` run once,
    as a user would run it (no --workdir: $SOUPJAX_WORKDIR), on the real Fashion-MNIST."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path_factory.mktemp("finetuned") / "work"
    env = dict(os.environ, SOUPJAX_WORKDIR=str(workdir), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "soupjax.finetune", "--config", "configs/fashion_mnist_vit.py:testing,sweep=2",
           f"--config.data.data_dir={fashion_mnist_data_dir}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"workdir": workdir, "cmd": cmd, "env": env, "stdout": out.stdout}
