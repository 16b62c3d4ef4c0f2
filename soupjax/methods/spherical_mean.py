"""Spherical averaging of K: per tensor, the Karcher mean of the directions of the K displacements on
the unit sphere, at the mean of their lengths (``merging.spherical_mean``): SLERP's idea for more than
two models. For two displacements of equal length it is SLERP at t = 0.5.

Nothing to choose: no held-out evaluation. Merged tensor by tensor from disk.
"""
from __future__ import annotations

from soupjax.methods import Dish, Merge, Method, register


def build(dish, point, init, sources, seed=0):
    """The spherical mean of every source's displacement, per tensor (``point`` is empty)."""
    from soupjax.arithmetic import merging
    return merging.merge_by_tensor(init, sources, lambda path, x0, xs: merging.spherical_mean(x0, xs))


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    return Dish(dish, [1.0 / k] * k, build(dish, {}, cooking.init_source(), cooking.sources()))


register(Method("spherical_mean", "merge", "Karcher mean of the K displacements' directions on the sphere",
                cook, needs_init=True, order=54, merge=Merge(build, {"spherical_mean": ()})))
