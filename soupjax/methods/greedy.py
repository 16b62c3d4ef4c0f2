"""Greedy soup (Wortsman et al. 2022, Recipe 1): ingredients best-first by held-out accuracy, each
added when the soup's held-out accuracy does not fall (``--greedy_strict``: only when it rises).

One held-out evaluation per ingredient after the first; memory: the running sum, its reference and
one candidate. ``--greedy_order=random`` visits the ingredients in a seeded random order instead.
With ``--recalibrate_bn`` the first ingredient is scored recalibrated too, as every candidate is.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, Option, register

OPTIONS = {
    "greedy_strict": Option(False, "Greedy/pruned/greedy ensemble: require held-out accuracy to rise (>) instead "
                            "of not fall (>=).", kind="bool"),
    "greedy_order": Option("sorted", "Greedy: rank by held-out accuracy, or a random order.", kind="str",
                           choices=("sorted", "random")),
}


def key(options, dish: str) -> dict:
    # The names a soup cooked by an earlier soupjax stored, so that it is still recognised and resumed.
    recalibrated = {"recalibrated": "first_and_candidates"} if options["recalibrate_bn"] else {}
    return {"strict": options["greedy_strict"], "order": options["greedy_order"], "seed": options["seed"],
            **recalibrated}


def cook(cooking) -> list[Dish]:
    from soupjax.arithmetic import soups as recipes
    o = cooking.options
    res = recipes.greedy(cooking.loaders, cooking.heldout, cooking.heldout_accuracy, strict=o["greedy_strict"],
                         order=o["greedy_order"], seed=o["seed"], evaluate_first=bool(o["recalibrate_bn"]))
    steps = cooking.named_steps(res.progression)
    return [Dish("greedy", res.weights, res.variables, meta={"progression": steps, "order": o["greedy_order"]})]


register(Method("greedy", "soup", "ingredients added best-first while held-out accuracy does not fall", cook,
                options=OPTIONS, uses=("seed", "recalibrate_bn"), key=key, order=20))
