"""Cooking on a pod slice: two processes joined by ``jax.distributed`` cook ``--recipe all`` and write the
report and the soups one process writes from the same ingredients.

As tests/test_multihost.py does for training: two processes on this machine, one CPU device each, a
coordinator on a free local port, collectives over gloo. Each runs ``python -m soupjax.soup`` (through
tests/multihost_cook_worker.py, which serves mock data whose split strings select real slices, so that
each process reads its own half of every split). The reference, one process, cooks the same
ingredients here while they run.

Bit for bit: each process evaluates half of a split's batch where the one process evaluates all of it
on one device, and a row's logits do not depend on how many rows share its batch here (checked by the
comparison itself); the learned soup's steps see the whole held-out batches on every process
(``Evaluations.global_batches``), the same arithmetic as one process. So every saved soup, every
soup's meta.json and the report's numbers (accuracies, losses, paired tests, weights, choices) are
equal; only times, memory, dates and paths may differ.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from soupjax import cooking
from soupjax.config.base import load_config
from soupjax.io import checkpoints

from test_multihost import free_port, while_they_run

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_cook_worker.py")
# Every method, each with a grid of more than one point where it has one (a real choice), one learned
# epoch in both modes, the test split and one synthetic shift.
OPTIONS = {"task_arithmetic_scales": "0.5,1", "ties_densities": "0.2,1", "ties_lambdas": "1", "dare_drop_rates": "0,0.5",
           "dare_scales": "1", "slerp_ts": "0,0.5", "wise_ft_alphas": "0.5,1", "learned_epochs": 1,
           "learned_mode": "both", "seed": 3, "eval_batch_size": 64}
SHIFTS = ["shift/gaussian_noise-3"]
# What may differ between two cooks of the same soups: when and how long, memory, where.
VOLATILE = {"seconds", "peak_memory_mb", "created", "command", "path"}


def _worker_module():
    spec = importlib.util.spec_from_file_location("multihost_cook_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER_MODULE = _worker_module()


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> Path:
    """Two ingredients of the tiny ``testing`` ViT (one block), its init plus seeded noise (as
    test_methods makes them), and their shared start beside them as training writes it (so that no
    process rebuilds it)."""
    from soupjax.importers.fingerprint import weights_fingerprint
    from soupjax.training import shared_init
    root = tmp_path_factory.mktemp("multihost_cooking") / "ingredients"
    config = load_config("configs/fashion_mnist_vit.py:testing")
    config.model.num_layers = 1  # one block, as tests/test_multihost.py: every process compiles less
    config.data.test_examples = 0  # the whole (mocked, 64-example) test split
    assert config.head_init == "default"  # the start is the base init itself
    base = shared_init.base_init(config)
    fingerprints = {"init_fingerprint": weights_fingerprint(base["params"]),
                    "start_fingerprint": weights_fingerprint(base)}
    shared_init.save_start(shared_init.start_directory(root), base, config=config, **fingerprints)
    for i in range(2):
        rng = np.random.default_rng(i)
        tree = jax.tree_util.tree_map(
            lambda x: np.asarray(x) + 0.05 * rng.normal(size=np.shape(x)).astype(np.asarray(x).dtype), base)
        checkpoints.save_ingredient(root / f"ing{i}", tree, {
            "config": config.to_dict(), **fingerprints, "metrics": {"heldout": {"accuracy": 0.1 * (i + 1)}}})
    return root


def _start(process_id: int, port: int, flags: list[str]) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
    # XLA_FLAGS as this process has them (it is the reference: one device, and e.g. conftest's one-thread
    # Eigen, whose matrix products round differently from the multi-threaded ones).
    return subprocess.Popen([sys.executable, str(WORKER), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _without(value, volatile=VOLATILE):
    """``value`` (JSON) without the fields that say when, how long, how much memory and where."""
    if isinstance(value, dict):
        return {k: _without(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [_without(v, volatile) for v in value]
    return value


def _soups(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if checkpoints.is_ingredient(p))


@pytest.mark.slow
def test_two_processes_cook_the_soups_and_report_of_one(ingredients, tmp_path):
    assert jax.process_count() == 1 and jax.device_count() == 1  # the reference: one process, one device
    two, one = tmp_path / "two", tmp_path / "one"
    flags = ["--recipe=all", f"--ingredients={ingredients}", f"--out={two}", f"--workdir={tmp_path / 'work'}",
             f"--shifts={','.join(SHIFTS)}", *(f"--{k}={v}" for k, v in OPTIONS.items())]
    port = free_port()
    procs = [_start(i, port, flags) for i in range(2)]

    def cook_as_one_process():
        with WORKER_MODULE.sliced_mock_data():
            return cooking.cook("all", ingredients, one, shifts=SHIFTS, **OPTIONS)

    results, logs = while_they_run(procs, cook_as_one_process)  # one process cooks here while the two run
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    # Both cooked every dish; process 0 alone wrote the report.
    assert "report: " in logs[0] and "report: " not in logs[1]

    names = _soups(one)
    assert len(names) >= 10 and names == _soups(two)
    for name in names:
        mine, theirs = checkpoints.load_variables(one / name), checkpoints.load_variables(two / name)
        a, b = jax.tree_util.tree_flatten_with_path(mine)[0], jax.tree_util.tree_flatten_with_path(theirs)[0]
        assert [p for p, _ in a] == [p for p, _ in b], name
        for (path, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{name} {jax.tree_util.keystr(path)}")
        assert _without(checkpoints.load_meta(one / name)) == _without(checkpoints.load_meta(two / name)), name

    report_one, report_two = (json.loads((out / "report.json").read_text()) for out in (one, two))
    assert _without(report_two) == _without(report_one)
    assert [row["name"] for row in report_two["soups"]] == [row["name"] for row in results["soups"]]
    # The whole splits, each example once: 16 held-out and 64 test examples, as one process reads them.
    assert report_two["meta"]["splits"]["heldout"] == 16 and report_two["meta"]["splits"]["test"] == 64
