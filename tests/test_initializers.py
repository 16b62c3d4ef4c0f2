"""soupjax's flat-drawn initialisers give JAX's values bit for bit: the models' inits (and the init
fingerprints recorded beside every ingredient) are what they were with Flax's initialisers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soupjax.models import initializers

# A conv kernel (ResNet, patch embeddings), a dense kernel, a 3-D position embedding, a shape with a
# dimension of 1 and one of rank 5. (Few: each compiles JAX's draw, which is what is slow.)
SHAPES = [(3, 1, 4, 8), (5, 3), (1, 50, 24), (2, 1, 3, 2, 2)]
# Each distribution once, each mode once: the figures that the draw is scaled by.
VARIANCE_SCALING = [(2.0, "fan_out", "normal"), (1.0, "fan_in", "truncated_normal"), (1 / 3, "fan_avg", "uniform"),
                    (0.5, "fan_geo_avg", "normal")]


def _same(ours, theirs, shape, dtype, seed):
    key = jax.random.PRNGKey(seed)
    a = jax.jit(lambda k: ours(k, shape, dtype))(key)
    b = jax.jit(lambda k: theirs(k, shape, dtype))(key)
    assert a.shape == b.shape == shape and a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"{shape} {dtype}")


@pytest.mark.parametrize("scale,mode,distribution", VARIANCE_SCALING)
def test_variance_scaling_is_jaxs(scale, mode, distribution):
    ours = initializers.variance_scaling(scale, mode, distribution)
    theirs = jax.nn.initializers.variance_scaling(scale, mode, distribution)
    for i, shape in enumerate(SHAPES[:2] if mode == "fan_geo_avg" else SHAPES):
        _same(ours, theirs, shape, jnp.float32, seed=i)
    if mode == "fan_out":
        _same(ours, theirs, SHAPES[0], jnp.bfloat16, seed=7)


def test_he_normal_fan_out_is_jaxs():
    _same(initializers.he_normal_fan_out(), jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
          SHAPES[0], jnp.float32, seed=1)


def test_a_vector_is_refused_where_fans_need_a_kernel():
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(8,\)"):
        initializers.he_normal_fan_out()(jax.random.PRNGKey(0), (8,))
    with pytest.raises(ValueError, match="invalid mode"):
        initializers.variance_scaling(1.0, "fan_sideways", "normal")
