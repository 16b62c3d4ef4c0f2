"""Linear-probe head init (the "LP" of LP-FT): fit the classifier on frozen features of the init.

Fine-tuning from a zero or random head first spends its steps repairing the head and drags the body
away from the pretrained weights, so ingredients end up in different basins and soup badly. Fitting
the head first on frozen features, as the paper's LP-FT runs do, gives every ingredient the same
sensible starting head.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from soupjax import data


def head_inputs(model: nn.Module, variables: dict[str, Any], images: jax.Array, head_name: str = "head") -> jax.Array:
    """The features that enter the module named ``head_name`` (captured with a method interceptor)."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == head_name and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    if not captured:
        raise ValueError(f"the model has no sub-module named {head_name!r} to fit a linear probe for")
    return captured[0]


def fit_head(model: nn.Module, variables: dict[str, Any], config: ml_collections.ConfigDict,
             head_name: str = "head") -> dict[str, Any]:
    """Return ``variables`` with the head replaced by an L2-regularised logistic regression.

    Features come from ``config.linear_probe.num_examples`` unaugmented training images; the fit is
    full-batch Adam on float32 features, which converges in a few hundred steps for these sizes.
    """
    key = _probe_key(variables, config, head_name)
    if key not in _FITTED:
        _FITTED[key] = _fit(model, variables, config, head_name)
    kernel, bias = _FITTED[key]
    head = dict(variables["params"][head_name])
    head["kernel"] = np.asarray(kernel.reshape(head["kernel"].shape), head["kernel"].dtype)
    head["bias"] = np.asarray(bias, head["bias"].dtype)
    params = dict(variables["params"])
    params[head_name] = head
    return dict(variables, params=params)


# Every ingredient of a sweep starts from the same init and probes the same examples, so the probe is
# fitted once per process and reused: on a small model the probe's input pipeline costs as much as
# fine-tuning itself.
_FITTED: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _probe_key(variables: dict[str, Any], config: ml_collections.ConfigDict, head_name: str) -> str:
    """What the fitted probe depends on: the variables, the model, the evaluation data and the probe."""
    from soupjax.config.base import fingerprint as config_fingerprint
    from soupjax.importers.fingerprint import weights_fingerprint as fingerprint
    return config_fingerprint({"variables": fingerprint(variables), "model": config.model,
                               "data": data.eval_fingerprint(config.data), "probe": config.linear_probe,
                               "batch": config.eval_batch_size, "head": head_name})


def _fit(model: nn.Module, variables: dict[str, Any], config: ml_collections.ConfigDict,
         head_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The probe's kernel and bias, in the units of the unstandardised features."""
    lp = config.linear_probe
    feature_fn = jax.jit(lambda v, x: head_inputs(model, v, x, head_name))
    feats, labels, seen = [], [], 0
    for batch in data.eval_batches(config.data, "train", config.eval_batch_size):
        keep = np.asarray(batch["mask"]) > 0
        f = np.asarray(feature_fn(variables, batch["image"]))[keep]
        feats.append(f.reshape(f.shape[0], -1))
        labels.append(np.asarray(batch["label"])[keep])
        seen += int(keep.sum())
        if seen >= lp.num_examples:
            break
    x = jnp.asarray(np.concatenate(feats)[: lp.num_examples], jnp.float32)
    y = jnp.asarray(np.concatenate(labels)[: lp.num_examples])
    num_classes = data.num_classes(config.data)
    # Standardising the features makes one learning rate work for every backbone; it is folded
    # back into the kernel and bias afterwards.
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std

    def loss_fn(w):
        logits = xs @ w["kernel"] + w["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + lp.l2 * jnp.sum(w["kernel"] ** 2)

    w = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    opt = optax.adam(0.05)
    opt_state = opt.init(w)

    @jax.jit
    def step(w, opt_state):
        loss, g = jax.value_and_grad(loss_fn)(w)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(w, updates), opt_state, loss

    for _ in range(int(lp.steps)):
        w, opt_state, _ = step(w, opt_state)
    kernel = w["kernel"] / std[:, None]
    bias = w["bias"] - mean @ kernel
    return np.asarray(kernel), np.asarray(bias)
