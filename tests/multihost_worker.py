"""One process of tests/test_multihost.py: a training step and an evaluation on a fixed global batch.

Run as ``python tests/multihost_worker.py OUT.npz`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set, so that ``soupjax.devices.sharding.initialize_multihost``
starts ``jax.distributed`` as it would on a cluster; without them it is one process holding the whole
batch, the reference. Every process builds the same global data and feeds only its own rows, as the
input pipeline does on a pod slice (each host reads its shard), through the same soupjax code the
trainer and the evaluator run: ``sharding.shard_batch``, ``train_step.make_train_step``,
``evaluate.Evaluator``.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
TRAIN_BATCH = 8          # the global batch of the one training step
EVAL_BATCH = 8           # global evaluation batch
EVAL_EXAMPLES = 20       # 3 batches, the last with 4 padded rows (all of them on the second process)


def global_data() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The training batch and the padded evaluation batches, identical in every process."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, TRAIN_BATCH).astype(np.int32)
    train = {"image": rng.normal(size=(TRAIN_BATCH, *IMAGE_SHAPE)).astype(np.float32), "label": labels,
             "targets": np.eye(NUM_CLASSES, dtype=np.float32)[labels]}
    images = rng.normal(size=(EVAL_EXAMPLES, *IMAGE_SHAPE)).astype(np.float32)
    eval_labels = rng.integers(0, NUM_CLASSES, EVAL_EXAMPLES).astype(np.int32)
    batches = []
    for start in range(0, EVAL_EXAMPLES, EVAL_BATCH):
        n = min(EVAL_BATCH, EVAL_EXAMPLES - start)
        pad = EVAL_BATCH - n
        batches.append({
            "image": np.concatenate([images[start:start + n], np.zeros((pad, *IMAGE_SHAPE), np.float32)]),
            "label": np.concatenate([eval_labels[start:start + n], np.zeros(pad, np.int32)]),
            "mask": np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]),
            "index": np.arange(start, start + EVAL_BATCH),  # global row numbers, to line up the logits
        })
    return train, batches


def _my_rows(batch: dict[str, np.ndarray], process: int, count: int) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch, as the data pipeline hands it out."""
    share = len(next(iter(batch.values()))) // count
    return {k: v[process * share:(process + 1) * share] for k, v in batch.items()}


def compute() -> dict[str, Any]:
    """One step and one evaluation; returns this process's view of the results."""
    from soupjax.devices import sharding

    sharding.initialize_multihost()  # a no-op without the JAX_* variables: the one-process reference

    import jax
    import jax.numpy as jnp

    from soupjax import models
    from soupjax.config.base import base_config
    from soupjax.evaluation.evaluate import for_model
    from soupjax.training.train_step import make_optimizer, make_train_step

    process, count = jax.process_index(), jax.process_count()
    train_batch, eval_batches = global_data()
    mesh = sharding.data_mesh()
    # One block, and a head that starts random rather than zero so that the logits compared are not
    # all alike; the init is jitted with an 'rbg' key (eager threefry compiles every initialiser).
    model = models.get_model("vit-testing", NUM_CLASSES, num_layers=1, head_zero_init=False)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *IMAGE_SHAPE)), train=False))(
        jax.random.key(0, impl="rbg"))

    # SGD, not Adam: Adam's first step moves every weight by +-lr whatever the size of its gradient,
    # so the last-bit difference a cross-process sum makes could flip a near-zero gradient's sign.
    config = base_config()
    config.optimizer, config.learning_rate, config.momentum, config.label_smoothing = "sgd", 0.1, 0.9, 0.1
    tx, hparams = make_optimizer(config, 3)
    state = sharding.replicate({"step": jnp.zeros((), jnp.int32), "params": init["params"],
                                "opt_state": tx.init(init["params"])}, mesh)
    step = make_train_step(model, tx, mesh)
    state, metrics = step(state, sharding.shard_batch(_my_rows(train_batch, process, count), mesh),
                          jax.random.PRNGKey(1), hparams)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    params = jax.tree_util.tree_leaves_with_path(jax.device_get(state["params"]))

    evaluator = for_model(model, mesh)
    mine = [_my_rows(b, process, count) for b in eval_batches]
    result = evaluator({"params": jax.device_get(state["params"])}, mine, keep_logits=True)
    rows = np.concatenate([b["index"][b["mask"] > 0] for b in mine])  # the global row of each kept logit

    out = {"process": process, "process_count": count, "devices": jax.device_count(),
           "train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
           "eval_accuracy": result.accuracy, "eval_loss": result.loss, "eval_examples": result.num_examples,
           "eval_logits": result.logits, "eval_rows": rows}
    for path, leaf in params:
        out["param:" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def stop_on_a_signal_to_one_process(path: str) -> None:
    """``compute()``, then the stop votes of cli/preemption: process 1 alone gets SIGTERM before the vote
    at step 2, and every process must stop at the same step: unlagged (cooking's vote) at step 2, lagged
    (training's) at step 3. The results are saved in ``path`` before the lagged stop is raised, as a
    command saves its work before it stops; ``exit_on_preemption`` then exits with the agreed signal's
    status in every process."""
    import os
    import signal

    import jax

    from soupjax.cli import preemption
    results = compute()
    for lagged in (False, True):
        vote = preemption.StopVote(lagged=lagged)
        try:
            with preemption.boundaries(after="after the last step"):
                for step in range(1, 6):
                    if jax.process_index() == 1 and step == 2:
                        os.kill(os.getpid(), signal.SIGTERM)
                    signum = vote()
                    if signum:
                        results[f"stop_step_lagged_{lagged}"] = step
                        results[f"stop_signal_lagged_{lagged}"] = signum
                        if lagged:
                            np.savez(path, **results)
                        raise preemption.stop(signum, f"at step {step}")
        except preemption.Preempted:
            if lagged:
                raise
    np.savez(path, **results)  # not stopped: the test finds no lagged stop


if __name__ == "__main__":
    from soupjax.cli import preemption
    preemption.exit_on_preemption("multihost_worker", stop_on_a_signal_to_one_process)(sys.argv[1])
