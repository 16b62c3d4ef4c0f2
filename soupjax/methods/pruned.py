"""Pruned soup: start from the uniform soup and remove ingredients one at a time while held-out accuracy
does not fall, for ``--pruned_passes`` passes (removal is algebraic on the running mean).

One held-out evaluation per ingredient per pass, plus the start; memory: the running sum, its reference
and one candidate.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, Option, register

OPTIONS = {"pruned_passes": Option(1, "Pruned soup: passes over the ingredients.", kind="int", low=1)}


def cook(cooking, dish: str) -> Dish:
    from soupjax.arithmetic import soups
    o = cooking.options
    res = soups.pruned(cooking.loaders, cooking.heldout_accuracy, passes=o["pruned_passes"],
                         heldout_scores=cooking.heldout, strict=o["greedy_strict"])
    steps = cooking.named_steps(res.progression)
    return Dish(dish, res.weights, res.variables, meta={"progression": steps, "passes": o["pruned_passes"]})


register(Method("pruned", "soup", "the uniform soup, ingredients removed while held-out accuracy does not fall",
                cook, options=OPTIONS, uses=("greedy_strict",), order=30))
