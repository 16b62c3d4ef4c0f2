"""Spherical averaging of K: per tensor, the Karcher mean of the directions of the K displacements on
the unit sphere, at the mean of their lengths (``merging.spherical_mean``): SLERP's idea for more than
two models. For two displacements of equal length it is SLERP at t = 0.5.

Nothing to choose: no held-out evaluation. Merged tensor by tensor from disk.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, register


def cook(cooking) -> list[Dish]:
    from soupjax.arithmetic import merging
    k = len(cooking.names)
    variables = merging.merge_by_tensor(cooking.init_source(), cooking.sources(),
                                        merging.combiner("spherical_mean"))
    return [Dish("spherical_mean", [1.0 / k] * k, variables)]


register(Method("spherical_mean", "merge", "Karcher mean of the K displacements' directions on the sphere",
                cook, needs_init=True, order=54))
