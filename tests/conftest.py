"""Shared fixtures: CPU only, and the real Fashion-MNIST, a fine-tuned sweep and the XLA cache made once
per test run and shared by its xdist workers."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow without its eager Keras import, as the command lines start it (soupjax.cli.startup): in the
# test processes and in the scripts they start that are not soupjax's command lines.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# XLA on one thread in every test process and in the processes the tests start: the suite runs 2 xdist
# workers and their subprocesses on 2 cores, where each process's own pool of compute threads only
# oversubscribes the cores (its idle threads spin). Measured on tests/test_plateau.py and a train test on
# the loaded 2-core machine: 12% less CPU time. Production runs keep XLA's defaults.
# And XLA's CPU backend at optimisation level 1 (its default is 3): the suite compiles about 1,400
# programs, once each, and compiling was a fifth of its CPU time. experiments/bench_xla_opt_level.py (this
# 2-core VM): the testing ViT's and ResNet's init compile 1.4-1.7x faster and their train step 1.2x, with
# the same bits, the ViT's step running as fast and the ResNet's 1.35x slower (a few steps here); ResNet-50d
# at 224 px compiles about as fast, steps 12% slower and differs by 3e-6 of its largest parameter after 3
# steps. Every comparison in the suite is between runs under these same flags.
# README's test command, two runs each at either level on this VM: 636 and 628 s (1,147 and 1,120 CPU-s
# of tests) at 3; 537 and 601 s (969 and 1,081 CPU-s) at 1.
_TEST_XLA_FLAGS = {"xla_cpu_multi_thread_eigen": "false", "xla_backend_optimization_level": "1"}
for _flag, _value in _TEST_XLA_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):  # a flag set by whoever runs the tests wins
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

import pytest  # noqa: E402

# The importer parity tests import timm, whose torchvision pulls in triton. Loading triton after
# TensorFlow's libraries segfaults the process (seen with tensorflow-cpu 2.21 and triton 3.8), so when
# the test extras are installed, triton is loaded first in every test process.
try:
    import triton  # noqa: F401,E402
except ImportError:
    pass


def _mock_data_for_soupjax(real_mock_data):
    """``tfds.testing.mock_data`` as soupjax's tests use it: the pipeline forgets what it remembered of
    the data sets (named by directory and split, which the mocked examples share with other mocks and
    with the real data) on the way in and out, and a mocked builder counts as prepared for the checks
    made before training (``data.check_available``), and nothing is read straight from the files TFDS
    lists (``data.records``: they may be the real data set's). Injected here: the pipeline has no mock
    branches."""
    import contextlib
    from unittest import mock

    @contextlib.contextmanager
    def mock_data(*args, **kwargs):
        import tensorflow_datasets as tfds
        from soupjax.data import pipeline, records
        pipeline.forget()
        try:
            with real_mock_data(*args, **kwargs), \
                    mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True), \
                    mock.patch.object(records, "file_of", lambda builder, split: None):
                yield
        finally:
            pipeline.forget()

    return mock_data


def _install_mock_data() -> None:
    import tensorflow_datasets as tfds
    tfds.testing.mock_data = _mock_data_for_soupjax(tfds.testing.mock_data)


_install_mock_data()


def pytest_collection_modifyitems(config, items) -> None:
    """The tests marked ``runs_first`` first, the rest in their usual order. xdist's worksteal
    (pyproject.toml) gives each worker a contiguous part of this order and lets a worker that runs out
    take the end of the other's queue: the long tests start at once, and the short ones at the end fill
    the gaps (a two-minute study collected late would otherwise run alone at the end while the other
    worker idles)."""
    items.sort(key=lambda item: item.get_closest_marker("runs_first") is None)  # stable


def _shared_directory(tmp_path_factory, name: str, make: Callable[[Path], None] | None = None) -> Path:
    """A directory made once per test run, however many xdist workers it has: the first worker to ask
    runs ``make(directory)`` holding a lock, the others wait for it and use what it made. (A whole
    fine-tuning run or data set made once instead of once per worker, on a 2-core machine.)"""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base directories are siblings in this run's directory
    directory, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when make() fails
        if failed.exists():  # the other worker tried: one failure reported twice, not two long runs
            pytest.fail(f"{name}, made by another worker, failed: {failed.read_text()}")
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # what a worker killed half-way left
            directory.mkdir()
            try:
                if make is not None:
                    make(directory)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}"[-3000:])
                raise
            done.touch()
    return directory


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the whole test run: the trainer tests, the command lines they start
    and the other worker compile the same programs many times."""
    from soupjax.cli.startup import enable_compilation_cache
    directory = str(_shared_directory(tmp_path_factory, "jax_cache"))
    enable_compilation_cache(directory)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory  # for the subprocesses the CLI tests start
    return directory


@pytest.fixture(scope="session")
def fashion_mnist_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the real Fashion-MNIST (Debian's files), prepared once per test run."""
    from soupjax.data import fashion_mnist_local
    return str(_shared_directory(tmp_path_factory, "tfds",
                                 lambda directory: fashion_mnist_local.prepare(data_dir=str(directory))))


@pytest.fixture(scope="session")
def finetuned_workdir(tmp_path_factory, fashion_mnist_data_dir, compilation_cache):
    """``python -m soupjax.finetune --config configs/fashion_mnist_vit.py:testing,sweep=2`` run once per
    test run, as a user would run it (no --workdir: $SOUPJAX_WORKDIR), on the real Fashion-MNIST.
    Shared by the workers: tests that cook or change ingredients work on copies of it."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "soupjax.finetune", "--config", "configs/fashion_mnist_vit.py:testing,sweep=2",
           f"--config.data.data_dir={fashion_mnist_data_dir}"]

    def finetune(directory: Path) -> None:
        env = dict(os.environ, SOUPJAX_WORKDIR=str(directory / "work"), JAX_PLATFORMS="cpu")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        (directory / "stdout.txt").write_text(out.stdout)

    shared = _shared_directory(tmp_path_factory, "finetuned", finetune)
    workdir = shared / "work"
    env = dict(os.environ, SOUPJAX_WORKDIR=str(workdir), JAX_PLATFORMS="cpu")
    return {"workdir": workdir, "cmd": cmd, "env": env, "stdout": (shared / "stdout.txt").read_text()}


# The one-point grids and options of the shared `--recipe all` cook below: each merge's hyperparameter is
# a value a default grid would not pick by itself (1.5, 0.25, seed 3), so that the API test's comparison
# with `api.merge` at those values is not a comparison of defaults.
COOK_ALL_OPTIONS = ("--learned_epochs=1", "--shifts=", "--task_arithmetic_scales=1.5", "--ties_densities=0.5",
                    "--ties_lambdas=1.5", "--dare_drop_rates=0.5", "--dare_scales=1.5", "--slerp_ts=0.25",
                    "--wise_ft_alphas=0,1", "--seed=3")


def cook_all_command(finetuned: dict, data_dir: str, out: Path) -> list[str]:
    """``python -m soupjax.soup --recipe all`` of the fine-tuned sweep with COOK_ALL_OPTIONS, into ``out``."""
    return [sys.executable, "-m", "soupjax.soup", "--recipe", "all", *COOK_ALL_OPTIONS,
            f"--ingredients={finetuned['workdir'] / 'ingredients'}", f"--data_dir={data_dir}", f"--out={out}"]


@pytest.fixture(scope="session")
def cooked_all(tmp_path_factory, finetuned_workdir, fashion_mnist_data_dir) -> Path:
    """The fine-tuned sweep cooked once per test run with every recipe (``cook_all_command``): the
    reference of the killed-cook test and the soups the API's merges are compared with, bit for bit.
    Read only: a test that cooks more works on a copy."""
    root = Path(__file__).resolve().parents[1]

    def cook(directory: Path) -> None:
        out = subprocess.run(cook_all_command(finetuned_workdir, fashion_mnist_data_dir, directory / "soups"),
                             env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, cwd=root,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

    return _shared_directory(tmp_path_factory, "cooked_all", cook) / "soups"
