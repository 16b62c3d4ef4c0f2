"""Two processes joined by ``jax.distributed`` give the numbers of one process on the same global batch.

This is how a Cloud TPU pod slice runs soupjax: one process per host, each feeding its share of every
batch. Here the two processes are on this machine, each with one CPU device; their collectives go over
gloo (TCP), JAX's CPU default, and the coordinator listens on a free local port. The worker,
tests/multihost_worker.py, runs the trainer's step and the evaluator through soupjax's own sharding;
then one process alone gets SIGTERM, and both must agree on the step at which they stop
(soupjax.cli.preemption.StopVote) and exit with the preempted status, 143.

Tolerances: the processes sum their gradients across the network where the single process sums one
batch, and XLA compiles per-device programs for 4 rows instead of 8, so results agree to float32
rounding, not bit for bit: loss and logits to rtol 1e-5 (a few float32 ulps through a 2-layer ViT),
updated weights to atol 1e-6 (lr 0.1 times gradients equal to ~1e-6 relative). The two processes' copies
of the updated weights, which must stay replicas, are compared bit for bit, and accuracies and example
counts exactly.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    """A TCP port free on localhost now, for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def while_they_run(procs: list[subprocess.Popen], work: Callable[[], T], timeout: float = 240) -> tuple[T, list[str]]:
    """``work()`` done here while ``procs`` run, then their outputs; any still running at the end (a
    failure or a timeout) is killed, so that no worker outlives the test."""
    try:
        result = work()
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return result, logs


def _start(process_id: int, port: int, out: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
    # One CPU device per process, whatever the caller forced; the other flags as this process has them
    # (tests/conftest.py's: one compute thread, XLA's level 1).
    env["XLA_FLAGS"] = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    return subprocess.Popen([sys.executable, str(WORKER), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _reference() -> dict:
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute()


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tmp_path):
    port = free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = [_start(i, port, out) for i, out in enumerate(outs)]
    one, logs = while_they_run(procs, _reference)  # the reference computed here while the two run
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 143, f"process {i} failed:\n{log[-4000:]}"
        assert "multihost_worker: preempted by SIGTERM at step 3; rerun the same command to resume" in log, log[-4000:]
    two = [dict(np.load(out)) for out in outs]
    # Only process 1 got the signal; both stopped at the same step with it: cooking's vote at the step of
    # the signal, training's one step later (it reads the vote cast at the step before).
    for view in two:
        assert int(view["stop_step_lagged_False"]) == 2 and int(view["stop_step_lagged_True"]) == 3
        assert int(view["stop_signal_lagged_False"]) == int(view["stop_signal_lagged_True"]) == 15

    assert one["process_count"] == 1 and one["devices"] == 1
    for i, view in enumerate(two):
        assert int(view["process"]) == i and int(view["process_count"]) == 2 and int(view["devices"]) == 2

    params = sorted(k for k in one if k.startswith("param:"))
    assert params and params == sorted(k for k in two[0] if k.startswith("param:"))
    for key in params:
        np.testing.assert_array_equal(two[0][key], two[1][key], err_msg=f"replicas differ at {key}")
        np.testing.assert_allclose(two[0][key], one[key], rtol=0, atol=1e-6, err_msg=key)
    for view in two:
        np.testing.assert_allclose(float(view["train_loss"]), one["train_loss"], rtol=1e-5)
        assert float(view["train_accuracy"]) == one["train_accuracy"]
        # The evaluation is of the whole split, summed over the processes.
        assert int(view["eval_examples"]) == one["eval_examples"] == 20
        assert float(view["eval_accuracy"]) == one["eval_accuracy"]
        np.testing.assert_allclose(float(view["eval_loss"]), one["eval_loss"], rtol=1e-5)

    # Each process keeps the logits of the rows it fed in; together they are the reference's.
    assert len(two[0]["eval_rows"]) == 12 and len(two[1]["eval_rows"]) == 8  # the padding is all on 1
    rows = np.concatenate([v["eval_rows"] for v in two])
    assert sorted(rows.tolist()) == one["eval_rows"].tolist() == list(range(20))
    logits = np.concatenate([v["eval_logits"] for v in two])
    np.testing.assert_allclose(logits, one["eval_logits"][rows], rtol=1e-5, atol=1e-6)
