"""Greedy ensemble (the paper's Table 3 row): ingredients visited best-first by held-out accuracy, each
added to a logit ensemble when the ensemble's held-out accuracy does not fall (``--greedy_strict``: rises).

Uses the ingredients' held-out logits computed once: each step is an average of logits, not a forward
pass. At inference it costs one forward pass per model it kept.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, register


def select(heldout_logits, labels, order, strict: bool = False) -> tuple[list[int], list[dict]]:
    """The ingredients (indices) a greedy ensemble keeps, visiting them in ``order``, and its steps.

    ``heldout_logits[i]`` is ingredient i's (N, C) held-out logits; a candidate is kept when the mean of
    the kept logits with it scores at least (``strict``: more than) the current held-out accuracy: the
    greedy soup's rule (``soups.accepts``), applied to logits instead of weights.
    """
    import numpy as np
    from soupjax.arithmetic.soups import accepts
    labels = np.asarray(labels)
    first = order[0]
    kept, total = [first], np.asarray(heldout_logits[first], np.float64).copy()
    best = float(np.mean(total.argmax(-1) == labels))
    steps = [{"step": 0, "ingredient": first, "action": "add", "heldout": best, "n_ingredients": 1,
              "soup_heldout": best}]
    for step, i in enumerate(order[1:], start=1):
        candidate = total + heldout_logits[i]
        acc = float(np.mean(candidate.argmax(-1) == labels))
        if accepts(acc, best, strict=strict):
            kept.append(i)
            total, best = candidate, acc
            action = "add"
        else:
            action = "skip"
        steps.append({"step": step, "ingredient": i, "action": action, "heldout": acc,
                      "n_ingredients": len(kept), "soup_heldout": best})
    return kept, steps


def cook(cooking, dish: str) -> Dish:
    evals = cooking.evals
    order = cooking.ranked(cooking.options["greedy_ties"])
    kept, steps = select([ev.logits["heldout"] for ev in evals], evals[0].labels["heldout"], order,
                         strict=cooking.options["greedy_strict"])
    cooking.count_heldout(len(order) - 1)
    k = len(cooking.names)
    weights = [1.0 / len(kept) if i in kept else 0.0 for i in range(k)]
    return Dish(dish, weights, evaluation=cooking.ensemble_of(kept), forward_passes=len(kept),
                meta={"progression": cooking.named_steps(steps)})


register(Method("greedy_ensemble", "ensemble",
                "ingredients added best-first to a logit ensemble while held-out accuracy does not fall", cook,
                uses=("greedy_strict", "greedy_ties"), saves_model=False, order=91))
