"""The pieces of one training step, with no input pipeline: optimizer, loss, the jitted step.

Kept apart from train.py (the loop, data and checkpoints) so that the step can be built and timed on a
machine with JAX alone, e.g. an accelerator host without TensorFlow (experiments/bench_step.py).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:  # ml_collections is only needed for the annotation
    import ml_collections

from soupjax.config.base import check_choice
from soupjax.devices import sharding


def make_optimizer(config: "ml_collections.ConfigDict", steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, np.ndarray]]:
    """SGD+momentum or AdamW, decay on kernels only, clipping; and the hyperparameters to step it with.

    The numbers a sweep draws (learning rate, warm-up and length of the cosine schedule, weight decay,
    label smoothing) are returned as data for the step, not built into the optimizer: the compiled
    step then serves every ingredient of a sweep, instead of one compilation per ingredient (seconds
    on a CPU, a minute or more for a big model on a TPU). What stays built in is the structure:
    optimizer kind, momentum and clipping norm.
    """
    kind, momentum, clip = check_choice("optimizer", config.optimizer), config.momentum or None, float(config.grad_clip_norm)
    tx = _transformation(kind, momentum, clip)
    schedule = check_choice("lr_schedule", getattr(config, "lr_schedule", "cosine"))
    warmup = min(int(config.warmup_steps), max(steps - 1, 0))
    hparams = {"learning_rate": config.learning_rate, "warmup_steps": warmup, "total_steps": steps,
               "weight_decay": config.weight_decay, "label_smoothing": getattr(config, "label_smoothing", 0.0),
               "cosine": 1.0 if schedule == "cosine" else 0.0,
               # 'plateau': constant until the trainer sees the held-out accuracy level off and sets
               # decay_start (data, so the compiled step does not change), then linear to 0.
               "decay_start": float(steps), "decay_steps": 1.0}
    return tx, {k: np.float32(v) for k, v in hparams.items()}


@functools.lru_cache(maxsize=8)
def _transformation(kind: str, momentum: float | None, clip: float) -> optax.GradientTransformation:
    """The optimizer's structure, one object per structure in a process: the step built on it is then
    the same jitted function for every run that shares it (``make_train_step``)."""
    # Biases and normalisation scales are not decayed (the usual practice for ViT and ResNet).
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

    def chain(learning_rate, weight_decay):
        parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
        if kind == "sgd":
            parts += [optax.add_decayed_weights(weight_decay, mask=decay_mask),
                      optax.sgd(learning_rate, momentum=momentum)]
        else:
            parts.append(optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask))
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(learning_rate=0.0, weight_decay=0.0)


def learning_rate_at(step: jax.Array, hparams: Mapping[str, jax.Array]) -> jax.Array:
    """Linear warm-up from 0 to the peak, then either cosine decay to 0 at ``total_steps``
    (``cosine`` = 1) or constant until ``decay_start`` and linear to 0 over ``decay_steps``."""
    step = jnp.asarray(step, jnp.float32)
    peak, warmup, total = hparams["learning_rate"], hparams["warmup_steps"], hparams["total_steps"]
    rising = peak * step / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    cosine = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    cooling = jnp.clip((step - hparams.get("decay_start", total)) / jnp.maximum(hparams.get("decay_steps", 1.0), 1.0),
                       0.0, 1.0)
    after_warmup = jnp.where(hparams.get("cosine", 1.0) > 0, cosine, peak * (1.0 - cooling))
    return jnp.where(step < warmup, rising, after_warmup)


def _smooth(targets: jax.Array, label_smoothing: jax.Array) -> jax.Array:
    num_classes = targets.shape[-1]
    return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


@functools.lru_cache(maxsize=8)
def make_train_step(model, tx: optax.GradientTransformation, mesh):
    """The jitted ``step(state, batch, rng, hparams)``: replicated state in and out (donated), batch
    split over ``data``; ``hparams`` as returned by ``make_optimizer``.

    One per (model, optimizer structure, mesh) in a process: the runs of a sweep, and a run resumed in
    the same process, step with the same jitted function instead of tracing and lowering it again."""

    def step_fn(state: dict, batch: Mapping[str, jax.Array], rng: jax.Array, hparams: Mapping[str, jax.Array]):
        has_bn = "batch_stats" in state
        dropout_rng = jax.random.fold_in(rng, state["step"])
        learning_rate = learning_rate_at(state["step"], hparams)

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
            loss = optax.softmax_cross_entropy(logits, _smooth(batch["targets"], hparams["label_smoothing"])).mean()
            return loss, (logits, new_bn)

        (loss, (logits, new_bn)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        opt_state = state["opt_state"]
        injected = dict(opt_state.hyperparams, learning_rate=learning_rate, weight_decay=hparams["weight_decay"])
        opt_state = opt_state._replace(hyperparams={k: jnp.asarray(v, opt_state.hyperparams[k].dtype)
                                                    for k, v in injected.items()})
        updates, opt_state = tx.update(grads, opt_state, state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                         opt_state=opt_state, step=state["step"] + 1)
        if has_bn:
            new_state["batch_stats"] = new_bn
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": learning_rate,
        }
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(replicated, sharding.batch_sharded(mesh), replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))

