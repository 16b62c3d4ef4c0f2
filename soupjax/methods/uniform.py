"""Uniform soup: the mean of every ingredient's weights (Wortsman et al. 2022, the paper's first recipe).

Streamed one tensor at a time from disk (``recipes.uniform_by_tensor``): memory for the soup and a few
tensors, never a second whole model. No held-out evaluation: it chooses nothing.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, register


def cook(cooking) -> list[Dish]:
    from soupjax.arithmetic import soups as recipes
    k = len(cooking.names)
    return [Dish("uniform", [1.0 / k] * k, recipes.uniform_by_tensor(cooking.sources()))]


register(Method("uniform", "soup", "the mean of all ingredients' weights", cook, order=10))
