"""Uniform soup: the mean of every ingredient's weights (Wortsman et al. 2022, the paper's first recipe).

Streamed one tensor at a time from disk (``soups.uniform_by_tensor``): memory for the soup and a few
tensors, never a second whole model. No held-out evaluation: it chooses nothing.
"""
from __future__ import annotations

from soupjax.methods import Dish, Merge, Method, register


def build(dish, point, init, sources, seed=0):
    """The mean of the sources' weights (no init: ``init`` is not read)."""
    from soupjax.arithmetic import soups
    return soups.uniform_by_tensor(sources)


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    return Dish(dish, [1.0 / k] * k, build(dish, {}, None, cooking.sources()))


register(Method("uniform", "soup", "the mean of all ingredients' weights", cook, order=10,
                merge=Merge(build, {"uniform": ()})))
