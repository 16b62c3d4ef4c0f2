"""The pieces of one training step, with no input pipeline: optimizer, loss, the jitted step.

Kept apart from train.py (the loop, data and checkpoints) so that the step can be built and timed on a
machine with JAX alone, e.g. an accelerator host without TensorFlow (experiments/bench_step.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # ml_collections is only needed for the annotation
    import ml_collections

from soupjax import sharding


def make_optimizer(config: "ml_collections.ConfigDict", steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[int], jax.Array]]:
    """SGD+momentum or AdamW with linear warm-up and cosine decay, decay on kernels only, clipping."""
    warmup = min(int(config.warmup_steps), max(steps - 1, 0))
    if warmup > 0:
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, steps, 0.0)
    else:
        schedule = optax.cosine_decay_schedule(config.learning_rate, steps)
    # Biases and normalisation scales are not decayed (the usual practice for ViT and ResNet).
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "sgd":
        if config.weight_decay > 0:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None))
    elif config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
    return optax.chain(*parts), schedule


def _smooth(targets: jax.Array, label_smoothing: float) -> jax.Array:
    num_classes = targets.shape[-1]
    return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def make_train_step(model, tx: optax.GradientTransformation, schedule, label_smoothing: float, mesh):
    """The jitted step: replicated state in and out (donated), batch split over ``data``."""

    def step_fn(state: dict, batch: Mapping[str, jax.Array], rng: jax.Array):
        has_bn = "batch_stats" in state
        dropout_rng = jax.random.fold_in(rng, state["step"])

        def loss_fn(params):
            variables = {"params": params}
            if has_bn:
                variables["batch_stats"] = state["batch_stats"]
                logits, updates = model.apply(variables, batch["image"], train=True,
                                              rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
                new_bn = updates["batch_stats"]
            else:
                logits = model.apply(variables, batch["image"], train=True, rngs={"dropout": dropout_rng})
                new_bn = None
            logits = logits.astype(jnp.float32)
            loss = optax.softmax_cross_entropy(logits, _smooth(batch["targets"], label_smoothing)).mean()
            return loss, (logits, new_bn)

        (loss, (logits, new_bn)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                         opt_state=opt_state, step=state["step"] + 1)
        if has_bn:
            new_state["batch_stats"] = new_bn
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def apply_for_eval(model):
    """``(variables, images) -> logits`` in evaluation mode, for the evaluator and the soups."""
    return lambda variables, images: model.apply(variables, images, train=False)
