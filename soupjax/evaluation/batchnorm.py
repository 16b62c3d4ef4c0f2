"""BatchNorm recalibration: recompute a soup's running statistics on training batches.

Averaging BatchNorm networks averages their running means and variances too, and those no longer
describe the activations of the averaged weights; the soup can collapse to chance even when its
weights are good. Recomputing the statistics with the soup's own forward passes (as "REPAIR" and the
model-soups discussion of BatchNorm suggest) is the fix this module offers.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


_COMPILED: dict[int, tuple[nn.Module, Any]] = {}

# Per BatchNorm call of one batch, per feature: (n, the examples reduced over; c, a rough float32 mean;
# sum(x - c); sum((x - c)^2)). x - c is exact in float32 (the two are close) and small, so both sums
# keep their digits even when the mean is large; a float32 mean alone would be off by ~1e-6 of it.
_BatchMoments = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _feature_axes(module: nn.BatchNorm, ndim: int) -> tuple[int, ...]:
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    return tuple(sorted(a % ndim for a in axes))


def _stats_fn(model: nn.Module):
    """One jitted statistics pass per model, parameters as arguments: greedy and pruned soups
    recalibrate every candidate, which must not recompile (or bake the weights in as constants).

    It runs the model in training mode (each BatchNorm normalises with its batch's statistics, as in
    training) and returns, for every BatchNorm that does so, the moments of its input: its path in
    ``batch_stats`` -> list of ``_BatchMoments`` (one per call).
    """
    if id(model) not in _COMPILED:
        @jax.jit
        def stats(variables, images) -> dict[tuple[str, ...], list[_BatchMoments]]:
            moments: dict[tuple[str, ...], list[_BatchMoments]] = {}

            def capture(next_fun, args, kwargs, context):
                module = context.module
                if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                    use_running = kwargs.get("use_running_average")
                    if use_running is None:
                        use_running = module.use_running_average
                    if not use_running:
                        # The input itself, not the module's running-average update: that update is
                        # momentum-scaled and its variance is E[x^2] - E[x]^2 in float32, both of
                        # which lose the digits of a large mean. Shifted sums instead (_BatchMoments).
                        x = jnp.asarray(args[0], jnp.float32)
                        features = _feature_axes(module, x.ndim)
                        reduce = tuple(a for a in range(x.ndim) if a not in features)
                        shift = jnp.mean(x, axis=reduce)
                        shape = [x.shape[a] if a in features else 1 for a in range(x.ndim)]
                        d = x - shift.reshape(shape)
                        count = jnp.float32(np.prod([x.shape[a] for a in reduce]))
                        moments.setdefault(tuple(module.path), []).append(
                            (count, shift, jnp.sum(d, axis=reduce), jnp.sum(jnp.square(d), axis=reduce)))
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(capture):
                model.apply(variables, images, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(0)})
            return moments
        _COMPILED[id(model)] = (model, stats)  # the model is kept alive so its id is never reused
    return _COMPILED[id(model)][1]


class _RunningMoments:
    """Chan et al.'s parallel combination of per-batch (count, mean, M2) into population moments, in
    float64 on the host: exact to float64 rounding whatever the size of the mean."""

    def __init__(self) -> None:
        self.count = 0.0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, count: float, shift: np.ndarray, sum_d: np.ndarray, sum_d2: np.ndarray) -> None:
        """One batch's ``_BatchMoments``: sums of ``d = x - shift`` over ``count`` examples."""
        sum_d, sum_d2 = np.asarray(sum_d, np.float64), np.asarray(sum_d2, np.float64)
        mean = np.asarray(shift, np.float64) + sum_d / count
        m2 = np.maximum(sum_d2 - sum_d ** 2 / count, 0.0)  # sum_d is ~0: no cancellation
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def variance(self) -> np.ndarray:
        """The population (biased) variance, as BatchNorm normalises with."""
        return self.m2 / self.count


def recalibrate(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Mapping[str, np.ndarray]],
                num_batches: int) -> dict[str, Any]:
    """Return ``variables`` with ``batch_stats`` replaced by the soup's population statistics.

    For every BatchNorm, ``mean`` and ``var`` become the mean and the population (biased, divided by
    n) variance of its input over all examples (and all positions) of the first ``num_batches`` full
    batches, exactly as if those batches were one: a batch's mean counts with its number of examples,
    and the spread between batch means is part of the variance. The model runs in training mode, so
    each BatchNorm's input is what the layers before it give when they normalise with the batch's own
    statistics (as during training, and as PyTorch's recalibration does). Batches with padding (a mask
    with zeros) are skipped: padding would bias the statistics. Per batch, sums of the input's
    deviations from a rough mean are taken in float32 on the device; batches are combined in float64
    on the host. Parameters and
    the statistics of BatchNorms that never use batch statistics are untouched.
    """
    if "batch_stats" not in variables:
        return dict(variables)
    stats_fn = _stats_fn(model)
    running: dict[tuple[str, ...], _RunningMoments] = {}
    count = 0
    for batch in batches:
        if count >= num_batches:
            break
        if "mask" in batch and not np.all(np.asarray(batch["mask"]) > 0):
            continue  # a padded last batch would bias the statistics towards the padding
        moments = jax.device_get(stats_fn(dict(variables), jnp.asarray(batch["image"])))
        for path, calls in moments.items():
            for n, shift, sum_d, sum_d2 in calls:
                running.setdefault(path, _RunningMoments()).add(float(n), shift, sum_d, sum_d2)
        count += 1
    if count == 0:
        raise ValueError("BatchNorm recalibration got no batches")
    # Plain nested dicts (from a FrozenDict too), so that leaves can be replaced.
    new_stats = flax.core.unfreeze(jax.tree_util.tree_map(np.asarray, dict(variables["batch_stats"])))
    for path, moments in running.items():
        node = new_stats
        for name in path:
            node = node[name]
        node["mean"] = moments.mean.astype(np.asarray(node["mean"]).dtype)
        node["var"] = moments.variance().astype(np.asarray(node["var"]).dtype)
    return dict(variables, batch_stats=new_stats)
