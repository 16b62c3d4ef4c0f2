"""Tests for soupjax.evaluation.evaluate: the evaluator's numbers, padded batches, and its overlap of batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from soupjax.evaluation import evaluate
from soupjax.models import get_model
from soupjax.evaluation.evaluate import apply_for_eval


def _setup(batches: int = 3, size: int = 8, last_real: int = 5):
    model = get_model('vit-testing', 4, head_zero_init=False)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False))
    rng = np.random.default_rng(0)
    data = []
    for b in range(batches):
        mask = np.ones(size, np.float32)
        if b == batches - 1:
            mask[last_real:] = 0  # the padded last batch of a split
        data.append({"image": rng.standard_normal((size, 16, 16, 3)).astype(np.float32),
                     "label": rng.integers(0, 4, size).astype(np.int32), "mask": mask})
    return model, variables, data


def test_evaluator_matches_a_plain_forward_pass_and_ignores_padding():
    model, variables, data = _setup()
    result = evaluate.Evaluator(apply_for_eval(model))(variables, iter(data), keep_logits=True)
    logits = np.concatenate([np.asarray(model.apply(variables, b["image"], train=False))[b["mask"] > 0]
                             for b in data])
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in data])
    expected = evaluate.metrics_from_logits(logits, labels)
    assert result.num_examples == len(labels) == 2 * 8 + 5
    np.testing.assert_allclose(result.logits, logits, atol=1e-5)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.correct, expected.correct)
    assert result.accuracy == expected.accuracy
    np.testing.assert_allclose(result.loss, expected.loss, rtol=1e-5)


def test_evaluator_dispatches_the_next_batch_before_reading_results_back(monkeypatch):
    """Batch i+1 is taken from the input (and dispatched) before batch i's results come back, so the
    input pipeline and the copies overlap the compute instead of waiting for it."""
    model, variables, data = _setup(batches=4)
    events = []

    def batches():
        for i, batch in enumerate(data):
            events.append(("pulled", i))
            yield batch

    real_local_rows = evaluate.local_rows
    read_batches = []

    def record(array):
        out = real_local_rows(array)
        if array.ndim == 2:  # the logits: exactly one per batch
            read_batches.append(len(read_batches))
            events.append(("read", read_batches[-1]))
        return out

    monkeypatch.setattr(evaluate, "local_rows", record)
    evaluate.Evaluator(apply_for_eval(model))(variables, batches(), keep_logits=True)
    for i in range(len(data) - 1):
        assert events.index(("pulled", i + 1)) < events.index(("read", i)), events
    assert [e for e in events if e[0] == "read"] == [("read", i) for i in range(len(data))]
