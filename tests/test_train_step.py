"""The training step: its schedule and optimizer match optax's own, and one compiled step serves a sweep."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soupjax import models
from soupjax.devices import sharding
from soupjax.config.base import base_config
from soupjax.training.train_step import learning_rate_at, make_optimizer, make_train_step


def _config(**overrides):
    c = base_config()
    c.optimizer, c.learning_rate, c.weight_decay, c.warmup_steps, c.label_smoothing = "adamw", 1e-3, 1e-4, 5, 0.0
    c.update(overrides)
    return c


@pytest.mark.parametrize("warmup,steps", [(5, 40), (0, 40), (39, 40)])
def test_schedule_is_optax_warmup_cosine(warmup, steps):
    _, hparams = make_optimizer(_config(warmup_steps=warmup), steps)
    warm = min(warmup, steps - 1)
    reference = (optax.warmup_cosine_decay_schedule(0.0, 1e-3, warm, steps, 0.0) if warm
                 else optax.cosine_decay_schedule(1e-3, steps))
    for step in range(steps + 3):
        np.testing.assert_allclose(learning_rate_at(step, hparams), reference(step), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_injected_hyperparameters_update_like_plain_optax(kind):
    config = _config(optimizer=kind, grad_clip_norm=1.0, momentum=0.9)
    tx, hparams = make_optimizer(config, 10)
    mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 10, 0.0)
    inner = (optax.adamw(schedule, weight_decay=1e-4, mask=mask) if kind == "adamw" else
             optax.chain(optax.add_decayed_weights(1e-4, mask=mask), optax.sgd(schedule, momentum=0.9)))
    plain = optax.chain(optax.clip_by_global_norm(1.0), inner)
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.full((4,), 0.5)}
    ours, theirs = tx.init(params), plain.init(params)
    p_ours = p_theirs = params
    for step in range(6):
        grads = jax.tree_util.tree_map(lambda x: jnp.sin(x * (step + 1)), p_ours)
        ours = ours._replace(hyperparams=dict(ours.hyperparams, learning_rate=learning_rate_at(step, hparams),
                                              weight_decay=jnp.float32(hparams["weight_decay"])))
        u_ours, ours = tx.update(grads, ours, p_ours)
        u_theirs, theirs = plain.update(grads, theirs, p_theirs)
        p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_ours, p_theirs)


def test_one_compiled_step_serves_every_ingredient_of_a_sweep():
    # Two ingredients that differ in everything a sweep draws must lower to the same program: the
    # persistent compilation cache then compiles the step once per sweep, not once per ingredient.
    model = models.get_model("vit-testing", 5, patch_size=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    mesh = sharding.data_mesh()
    batch = {"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.zeros(4, np.int32),
             "targets": np.eye(5, dtype=np.float32)[np.zeros(4, int)]}
    texts = []
    for overrides, steps in (({}, 80), ({"learning_rate": 3e-5, "weight_decay": 1e-2, "label_smoothing": 0.1,
                                         "warmup_steps": 20}, 160)):
        tx, hparams = make_optimizer(_config(**overrides), steps)
        state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                 "opt_state": tx.init(variables["params"])}
        step = make_train_step(model, tx, mesh)
        texts.append(step.lower(state, batch, jax.random.PRNGKey(0), hparams).as_text())
    assert texts[0] == texts[1]


def test_runs_of_one_structure_step_and_evaluate_with_the_same_jitted_functions():
    """A sweep's runs in one process, and a run's held-out curve and final evaluation, share the jitted
    step and the evaluator (nothing traced twice); another optimizer structure or model gets its own."""
    from soupjax.evaluation import evaluate
    model, mesh = models.get_model("vit-testing", 5, patch_size=4), sharding.data_mesh()
    first, _ = make_optimizer(_config(), 80)
    other_draw, _ = make_optimizer(_config(learning_rate=3e-5, weight_decay=1e-2, warmup_steps=20), 160)
    clipped, _ = make_optimizer(_config(grad_clip_norm=0.5), 80)
    assert other_draw is first and clipped is not first
    assert make_train_step(model, first, mesh) is make_train_step(model, other_draw, mesh)
    assert make_train_step(model, clipped, mesh) is not make_train_step(model, first, mesh)
    assert make_train_step(models.get_model("vit-testing", 3, patch_size=4), first, mesh) is not \
        make_train_step(model, first, mesh)
    assert evaluate.for_model(model, mesh) is evaluate.for_model(models.get_model("vit-testing", 5, patch_size=4))
    assert evaluate.for_model(models.get_model("vit-testing", 3, patch_size=4)) is not evaluate.for_model(model)
