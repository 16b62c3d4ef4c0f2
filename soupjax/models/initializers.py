"""Parameter initialisers that compile fast: the values of JAX's, drawn as one flat vector.

XLA on a CPU compiles an element-wise computation over a small many-dimensional shape (a conv kernel
[3, 3, 8, 8]) as nested loops whose short inner ones LLVM unrolls, copying the whole random-number
generator (threefry, then the normal transform) into each copy. Drawing the same number of values as
one vector and reshaping compiles in a fraction of the time (experiments/bench_init_compile.py gives
the figures for each model); a ResNet's init is dozens of such draws.

The values are JAX's, bit for bit: with JAX's default threefry (``jax_threefry_partitionable``), each
value of ``random.normal(key, shape)`` (``uniform``, ``truncated_normal``) is a function of the key and
of its index in row-major order only, so drawing ``prod(shape)`` values and reshaping gives the same
array. tests/test_initializers.py checks it against ``jax.nn.initializers``: inits, and the fingerprints
taken of them, do not change.

Used where it pays: the ResNets' conv kernels (the whole init compiles 1.9-3.1x faster, as measured in
docs/benchmarks.md). A ViT's or CLIP's init is mostly 2-D kernels, which compiled about as fast either
way in the same benchmark, so they keep Flax's initialisers.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
# The standard deviation of a standard normal truncated to (-2, 2), as JAX divides by it.
_TRUNCATED_STD = .87962566103423978


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """``jax.nn.initializers.variance_scaling(scale, mode, distribution)`` for real dtypes, with the
    default axes (fan in along -2, fan out along -1, the rest the receptive field), drawn flat."""
    if mode not in ("fan_in", "fan_out", "fan_avg", "fan_geo_avg"):
        raise ValueError(f"invalid mode for variance scaling initializer: {mode}")
    if distribution not in ("truncated_normal", "normal", "uniform"):
        raise ValueError(f"invalid distribution for variance scaling initializer: {distribution}")

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = _shape(shape)
        if len(shape) < 2:
            raise ValueError(f"variance scaling needs a kernel of at least 2 dimensions, got shape {shape}")
        # JAX's fan arithmetic, in its order and in floats, so that the scale is the same number.
        receptive_field = math.prod(shape) / shape[-2] / shape[-1]
        fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2,
                       "fan_geo_avg": (fan_in * fan_out) ** 0.5}[mode]
        variance = jnp.array(scale / denominator, dtype=dtype)
        n = (math.prod(shape),)
        if distribution == "truncated_normal":
            flat = jax.random.truncated_normal(key, -2, 2, n, dtype) * (
                jnp.sqrt(variance) / jnp.array(_TRUNCATED_STD, dtype))
        elif distribution == "normal":
            flat = jax.random.normal(key, n, dtype) * jnp.sqrt(variance)
        else:
            flat = jax.random.uniform(key, n, dtype, -1) * jnp.sqrt(3 * variance)
        return flat.reshape(shape)

    return init


def he_normal_fan_out() -> Initializer:
    """He-normal on the fan out: torchvision's and timm's conv init."""
    return variance_scaling(2.0, "fan_out", "normal")
