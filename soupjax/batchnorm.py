"""BatchNorm recalibration: recompute a soup's running statistics on training batches.

Averaging BatchNorm networks averages their running means and variances too, and those no longer
describe the activations of the averaged weights; the soup can collapse to chance even when its
weights are good. Recomputing the statistics with the soup's own forward passes (as "REPAIR" and the
model-soups discussion of BatchNorm suggest) is the fix this module offers.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


_COMPILED: dict[int, tuple[nn.Module, Any]] = {}


def _stats_fn(model: nn.Module):
    """One jitted statistics pass per model, parameters as arguments: greedy and pruned soups
    recalibrate every candidate, which must not recompile (or bake the weights in as constants)."""
    if id(model) not in _COMPILED:
        @jax.jit
        def stats(params, start, images):
            _, updates = model.apply({"params": params, "batch_stats": start}, images, train=True,
                                     mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
            return updates["batch_stats"]
        _COMPILED[id(model)] = (model, stats)  # the model is kept alive so its id is never reused
    return _COMPILED[id(model)][1]


def recalibrate(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Mapping[str, np.ndarray]],
                num_batches: int) -> dict[str, Any]:
    """Return ``variables`` with ``batch_stats`` replaced by the average batch statistics of the soup.

    Each batch is run in training mode starting from zero statistics, so the module's update
    ``new = momentum * 0 + (1 - momentum) * batch_stat`` gives the batch statistic up to the factor
    ``1 - momentum``; that factor is read off one extra pass starting from ones, which keeps this
    independent of how the model sets its momentum. Statistics are averaged with equal weight over
    ``num_batches`` batches (PyTorch's cumulative moving average). Parameters are untouched.
    """
    if "batch_stats" not in variables:
        return dict(variables)
    params = variables["params"]
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    ones = jax.tree_util.tree_map(jnp.ones_like, variables["batch_stats"])
    stats_fn = _stats_fn(model)

    def stats_from(start, images):
        return stats_fn(params, start, images)

    total, count, scale = None, 0, None
    for batch in batches:
        if count >= num_batches:
            break
        if "mask" in batch and not np.all(np.asarray(batch["mask"]) > 0):
            continue  # a padded last batch would bias the statistics towards the padding
        images = jnp.asarray(batch["image"])
        from_zero = stats_from(zeros, images)
        if scale is None:
            from_one = stats_from(ones, images)
            # from_one - from_zero = momentum, so 1 - momentum = 1 - (from_one - from_zero).
            scale = jax.tree_util.tree_map(lambda a, b: 1.0 - (a - b), from_one, from_zero)
        batch_stats = jax.tree_util.tree_map(lambda s, f: s / f, from_zero, scale)
        total = batch_stats if total is None else jax.tree_util.tree_map(jnp.add, total, batch_stats)
        count += 1
    if count == 0:
        raise ValueError("BatchNorm recalibration got no batches")
    new_stats = jax.tree_util.tree_map(
        lambda t, old: np.asarray(t / count, dtype=np.asarray(old).dtype), total, variables["batch_stats"])
    return dict(variables, batch_stats=new_stats)
