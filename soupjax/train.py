"""Fine-tune one ingredient: ``train_and_evaluate(config, workdir, ingredient_dir)``.

Resumable: the whole train state is saved by orbax every ``checkpoint_every_steps``; rerunning the same
command restores the latest step and the input pipeline continues from that step's batch. At the end the
ingredient (variables + meta.json) is written atomically, with the fingerprint of the init it started
from so that soups can refuse ingredients of different inits.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from soupjax import checkpoints, data, models, pretrained, sharding
from soupjax.evaluate import Evaluator
from soupjax.progress import Progress

Variables = dict[str, Any]


def build_model(config: ml_collections.ConfigDict):
    """The Flax module described by ``config.model`` for ``config.data``'s number of classes."""
    kwargs = dict(config.model.to_dict())
    name = kwargs.pop("name")
    return models.get_model(name, data.num_classes(config.data), **kwargs)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    return (1, config.data.image_size, config.data.image_size, config.data.channels)


def init_variables(config: ml_collections.ConfigDict, model=None) -> Variables:
    """The shared starting point of an ingredient: model init, then ``init_from``, then the head init."""
    model = model or build_model(config)
    rng = jax.random.PRNGKey(config.init_seed)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros(input_shape(config), jnp.float32), train=False))(rng)
    variables = jax.device_get(dict(variables))
    path = config.init_from.path
    if path:
        dont_load = tuple(config.init_from.dont_load)
        if checkpoints.is_ingredient(path):
            loaded = checkpoints.load_variables(path)
            variables = pretrained.merge_params(loaded, variables, dont_load=dont_load, source=str(path))
        else:
            variables = pretrained.load_pretrained(path, variables, dont_load=dont_load)
    if config.head_init == "linear_probe":
        from soupjax.linear_probe import fit_head
        variables = fit_head(model, variables, config)
    elif config.head_init != "default":
        raise ValueError(f"head_init must be 'default' or 'linear_probe', got {config.head_init!r}")
    return variables


def total_steps(config: ml_collections.ConfigDict) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    n = data.num_examples(config.data, "train")
    return max(1, int(math.ceil(config.num_epochs * n / config.batch_size)))


def make_optimizer(config: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
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
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def apply_for_eval(model):
    """``(variables, images) -> logits`` in evaluation mode, for the evaluator and the soups."""
    return lambda variables, images: model.apply(variables, images, train=False)


class MetricsWriter:
    """Metrics as JSON lines (always) and TensorBoard summaries (when TensorFlow is importable)."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if jax.process_index() == 0:
            try:
                import tensorflow as tf
                self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))
                self._tf = tf
            except ImportError:  # pragma: no cover - tensorflow is a runtime dependency
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if jax.process_index() != 0:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            with self._tb.as_default():
                for k, v in metrics.items():
                    self._tf.summary.scalar(k, float(v), step=int(step))
            self._tb.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       ingredient_dir: str | os.PathLike | None = None,
                       extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune one ingredient in ``workdir`` (resumable) and write it to ``ingredient_dir``.

    Returns the ingredient's meta.json contents.
    """
    wall_start = time.time()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    ingredient_dir = Path(ingredient_dir or workdir / "ingredient").absolute()
    mesh = sharding.data_mesh()
    sharding.check_global_batch_size(config.batch_size)

    model = build_model(config)
    init = init_variables(config, model)
    fingerprint = pretrained.fingerprint(init["params"])
    steps = total_steps(config)
    tx, schedule = make_optimizer(config, steps)

    state = {"step": jnp.zeros((), jnp.int32), "params": init["params"], "opt_state": tx.init(init["params"])}
    if "batch_stats" in init:
        state["batch_stats"] = init["batch_stats"]
    state = sharding.replicate(state, mesh)
    ckpts = checkpoints.TrainingCheckpoints(workdir / "checkpoints", save_every=config.checkpoint_every_steps)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpts.restore(abstract)
    if restored is not None:
        state = restored
        logging.info("resumed from step %d in %s", int(state["step"]), ckpts.directory)
    start_step = int(state["step"])

    train_step = make_train_step(model, tx, schedule, config.label_smoothing, mesh)
    rng = jax.random.PRNGKey(config.seed)
    writer = MetricsWriter(workdir)
    batches = data.train_batches(config.data, config.batch_size, seed=config.seed, start_step=start_step)
    progress = Progress(steps, f"train {ingredient_dir.name}", unit="steps", every=10.0)
    progress.done = start_step
    history: list[dict[str, float]] = []
    t0 = time.time()
    # Throughput is measured from the end of the first step on, so that compilation and the first
    # fill of the shuffle buffer do not count as training speed.
    steady_start, steady_step = None, start_step
    for step in range(start_step, steps):
        batch = sharding.shard_batch(next(batches), mesh)
        state, metrics = train_step(state, batch, rng)
        if steady_start is None:
            jax.block_until_ready(metrics)
            steady_start, steady_step = time.time(), step + 1
        if (step + 1) % config.log_every_steps == 0 or step + 1 == steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {step + 1}; lower the learning rate")
            if step + 1 > steady_step:
                rate = (step + 1 - steady_step) * config.batch_size / max(time.time() - steady_start, 1e-9)
                metrics["images_per_second"] = rate
            writer.write(step + 1, metrics)
            history.append({"step": step + 1, **metrics})
        progress(1, loss=float(history[-1]["loss"]) if history else float("nan"))
        ckpts.save(step + 1, state)
    jax.block_until_ready(state)
    train_time = time.time() - t0
    if ckpts.latest_step() != steps:
        ckpts.save(steps, state, force=True)
    ckpts.close()

    variables = {"params": state["params"]}
    if "batch_stats" in state:
        variables["batch_stats"] = state["batch_stats"]
    variables = jax.device_get(variables)
    evaluator = Evaluator(apply_for_eval(model), mesh)
    metrics = {}
    for split in ("heldout", "test"):
        result = evaluator(variables, data.eval_batches(config.data, split, config.eval_batch_size))
        metrics[split] = result.metrics()
        logging.info("%s: %s accuracy %.4f loss %.4f", ingredient_dir.name, split, result.accuracy, result.loss)

    meta = {
        "name": ingredient_dir.name,
        "config": config.to_dict(),
        "init_fingerprint": fingerprint,
        "init_from": config.init_from.path,
        "metrics": metrics,
        "steps": steps,
        "resumed_from_step": start_step,
        "train_seconds": train_time,
        "wall_seconds": time.time() - wall_start,
        "train_images_per_second": (history[-1].get("images_per_second", float("nan")) if history else float("nan")),
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        **(dict(extra_meta) if extra_meta else {}),
    }
    if jax.process_index() == 0:
        checkpoints.save_ingredient(ingredient_dir, variables, meta)
        if not config.keep_train_checkpoints:
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    return meta
