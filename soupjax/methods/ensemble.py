"""Logit ensemble: the mean of the K ingredients' logits (as the official code computes it), the
baseline a soup is measured against at 1/K of its inference cost.

K forward passes per image; nothing is chosen and nothing is saved (it is not one model).
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, register


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    evaluation = cooking.ensemble_of(range(k))
    return Dish(dish, [1.0 / k] * k, evaluation=evaluation, forward_passes=k, n_used=k)


register(Method("ensemble", "ensemble", "the mean of all K ingredients' logits (K forward passes)", cook,
                saves_model=False, order=90))
