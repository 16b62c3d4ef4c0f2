"""Jitted, data-parallel evaluation: accuracy and loss of a model on a split, and its logits if asked.

``for_model(model)`` is the evaluator of a soupjax model (``Evaluator(apply_for_eval(model), mesh)``).

Batches are split over the ``("data",)`` mesh, the variables are replicated, and padded examples
(``mask == 0``) count for nothing. Keeping the logits lets the logit ensemble be computed from K
evaluations without ever holding two models at once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from soupjax.devices import sharding

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def apply_for_eval(model: Any) -> ApplyFn:
    """``(variables, images) -> logits`` of a soupjax model in evaluation mode (``train=False``: dropout
    off, BatchNorm on its running statistics), for the evaluator and the soups."""
    return lambda variables, images: model.apply(variables, images, train=False)


def for_model(model: Any, mesh: Mesh | None = None) -> "Evaluator":
    """The evaluator of a soupjax model (``model.apply`` with ``train=False``), data-parallel over ``mesh``
    (default: every device, ``sharding.data_mesh()``). Its ``apply_fn`` is that function.

    One per (model, mesh) in a process: a training run asks twice (its held-out curve, its final
    evaluation), a sweep once per ingredient, and a new evaluator would trace and lower its step again
    before finding the compiled program (an evaluator holds no state between calls)."""
    return _evaluator_of(model, mesh or sharding.data_mesh())


@functools.lru_cache(maxsize=8)
def _evaluator_of(model: Any, mesh: Mesh) -> "Evaluator":
    return Evaluator(apply_for_eval(model), mesh)


@dataclasses.dataclass
class EvalResult:
    """Metrics of one model on one split; ``logits``/``labels`` only when asked for (real examples only)."""
    accuracy: float
    loss: float
    num_examples: int
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None
    correct: np.ndarray | None = None  # per-example 0/1, for paired tests between models

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "loss": self.loss, "num_examples": self.num_examples}


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> EvalResult:
    """Accuracy and mean cross-entropy of given logits (used for the logit ensemble)."""
    logits = np.asarray(logits, np.float32)
    log_probs = logits - _logsumexp(logits)
    loss = -np.take_along_axis(log_probs, labels[:, None].astype(np.int64), axis=1)[:, 0]
    correct = (logits.argmax(-1) == labels).astype(np.int8)
    return EvalResult(float(correct.mean()), float(loss.mean()), int(labels.shape[0]),
                      logits=logits, labels=labels, correct=correct)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


class Evaluator:
    """Evaluates any variables of one model architecture; compiles once per input shape.

    ``apply_fn(variables, images) -> logits`` must be a pure function (e.g. ``model.apply`` with
    ``train=False``; ``for_model`` makes it). ``projection`` selects a subset of logit columns
    (ImageNet-R/-A's 200 classes).
    """

    def __init__(self, apply_fn: ApplyFn, mesh: Mesh | None = None):
        self.mesh = mesh or sharding.data_mesh()
        self.apply_fn = apply_fn
        replicated = sharding.replicated(self.mesh)
        split = sharding.batch_sharded(self.mesh)
        self._step = jax.jit(self._eval_step, static_argnums=(2,),
                             in_shardings=(replicated, split),
                             out_shardings=split)

    def _eval_step(self, variables: Any, batch: Mapping[str, jax.Array], projection: tuple[int, ...] | None):
        logits = self.apply_fn(variables, batch["image"]).astype(jnp.float32)
        if projection is not None:
            logits = logits[:, jnp.asarray(projection)]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": loss, "correct": correct, "logits": logits}

    def __call__(self, variables: Any, batches: Iterable[Mapping[str, np.ndarray]], *,
                 projection: np.ndarray | None = None, keep_logits: bool = False, all_rows: bool = False,
                 progress: Callable[[int], None] | None = None) -> EvalResult:
        """Evaluate ``variables`` on every real example of ``batches`` (padded with ``mask``).

        The counts are summed over the processes. The per-example arrays (``logits``, ``labels``,
        ``correct``) are this process's rows, or, with ``all_rows``, every process's in the split's order
        (``sharding.gather_rows``: the same on every process, what one process would hold).
        """
        variables = sharding.replicate(variables, self.mesh)
        proj = None if projection is None else tuple(int(i) for i in projection)
        losses, corrects, logits_all, labels_all = [], [], [], []

        def collect(batch: Mapping[str, np.ndarray], out: Mapping[str, jax.Array]) -> None:
            mask = np.asarray(batch.get("mask", np.ones(len(batch["label"]), np.float32))) > 0
            # Each process keeps the rows it fed in: its addressable shards, in order.
            out = {k: local_rows(v) for k, v in out.items() if keep_logits or k != "logits"}
            losses.append(out["loss"][mask])
            corrects.append(out["correct"][mask])
            labels_all.append(np.asarray(batch["label"])[mask])
            if keep_logits:
                logits_all.append(out["logits"][mask])
            if progress is not None:
                progress(int(mask.sum()))

        # Batch i+1 is read, copied to the devices and dispatched before the results of batch i are
        # read back (dispatch does not wait), so that the input pipeline, copies and compute overlap
        # instead of taking turns.
        pending = None
        for batch in batches:
            device_batch = sharding.shard_batch({"image": batch["image"], "label": batch["label"]}, self.mesh)
            out = self._step(variables, device_batch, proj)
            if pending is not None:
                collect(*pending)
            pending = (batch, out)
        if pending is not None:
            collect(*pending)
        if not losses:
            raise ValueError("evaluation got no batches: the split is empty")
        loss = np.concatenate(losses)
        correct = np.concatenate(corrects)
        labels = np.concatenate(labels_all)
        n_local = np.array([correct.sum(), loss.sum(), correct.size], np.float64)
        n_total = _sum_over_processes(n_local)
        logits = np.concatenate(logits_all) if keep_logits else None
        correct = correct.astype(np.int8)
        if all_rows and jax.process_count() > 1:
            labels, correct = sharding.gather_rows(labels), sharding.gather_rows(correct)
            logits = None if logits is None else sharding.gather_rows(logits)
        return EvalResult(
            accuracy=float(n_total[0] / n_total[2]), loss=float(n_total[1] / n_total[2]),
            num_examples=int(n_total[2]), logits=logits, labels=labels, correct=correct)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in device order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Sum float64 ``values`` over the processes, in float64, so that every process gets what one
    process holding all the examples would compute.

    ``process_allgather`` goes through JAX arrays, which are float32 unless x64 is enabled: the
    accuracy came back as float32(correct) / float32(total) (0.10000000149 for 2 of 20), and a count
    beyond 2**24 examples would be rounded. Each value travels as two float32 numbers, ``hi + lo``,
    which hold a float64 to about 48 bits.
    """
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    values = np.asarray(values, np.float64)
    hi = values.astype(np.float32)
    lo = (values - hi.astype(np.float64)).astype(np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)  # (processes, 2, n)
    return (gathered[:, 0] + gathered[:, 1]).sum(0)
