"""Greedy soup (Wortsman et al. 2022, Recipe 1): ingredients best-first by held-out accuracy, each
added when the soup's held-out accuracy does not fall (``--greedy_strict``: only when it rises).

One held-out evaluation per ingredient after the first; memory: the running sum, its reference and
one candidate. ``--greedy_order=random`` visits the ingredients in a seeded random order instead.
Ingredients of equal held-out accuracy are visited in index order (``--greedy_ties=index``, the
default) or in reverse index order (``official``, as the official model-soups code visits them: it
sorts ascending and reverses); with several tied ingredients the two can cook different soups.
With ``--recalibrate_bn`` the first ingredient is scored recalibrated too, as every candidate is.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, Option, register

OPTIONS = {
    "greedy_strict": Option(False, "Greedy/pruned/greedy ensemble: require held-out accuracy to rise (>) instead "
                            "of not fall (>=).", kind="bool"),
    "greedy_order": Option("sorted", "Greedy: rank by held-out accuracy, or a random order.", kind="str",
                           choices=("sorted", "random")),
    "greedy_ties": Option("index", "Greedy/greedy ensemble: the order among ingredients of equal held-out accuracy: "
                          "'index' (the lower index, i.e. the earlier name, first) or 'official' (reverse index "
                          "order, as the official model-soups code visits them).", kind="str",
                          choices=("index", "official")),
}


def key(options, dish: str) -> dict:
    # With recalibration the first ingredient is scored recalibrated too: another soup than without.
    recalibrated = {"recalibrated": "first_and_candidates"} if options["recalibrate_bn"] else {}
    return {name: options[name] for name in (*OPTIONS, "seed")} | recalibrated


def cook(cooking, dish: str) -> Dish:
    from soupjax.arithmetic import soups
    o = cooking.options
    res = soups.greedy(cooking.loaders, cooking.heldout, cooking.heldout_accuracy, strict=o["greedy_strict"],
                         order=o["greedy_order"], seed=o["seed"], evaluate_first=bool(o["recalibrate_bn"]),
                         ties=o["greedy_ties"])
    steps = cooking.named_steps(res.progression)
    return Dish(dish, res.weights, res.variables, meta={"progression": steps, "order": o["greedy_order"]})


register(Method("greedy", "soup", "ingredients added best-first while held-out accuracy does not fall", cook,
                options=OPTIONS, uses=("seed", "recalibrate_bn"), key=key, order=20))
