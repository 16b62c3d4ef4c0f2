"""Learned soup: mixing weights trained by gradient descent on the held-out split (Wortsman et al. 2022),
one per ingredient ('global') or one per ingredient per parameter tensor ('layer'), through a softmax
with a learned temperature (``soupjax.arithmetic.learned``).

Costs ``--learned_epochs`` passes over the held-out split, forward and backward; memory: the K
ingredients on the host (or streamed from disk within ``--memory_budget_mb``). With ``--recalibrate_bn``
the weights are learned with the soup's own recalibrated statistics.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, Option, register

OPTIONS = {
    "learned_mode": Option("both", "Learned soup: one weight per ingredient, per layer, or both.", kind="str",
                           choices=("global", "layer", "both")),
    "learned_epochs": Option(5, "Learned soup: epochs over the held-out split.", kind="int", low=1),
    "learned_lr": Option(0.05, "Learned soup: Adam learning rate of the mixing logits.", low=0, low_open=True),
    "memory_budget_mb": Option(0.0, "Learned soup: host memory for ingredients; 0 = keep all on host, smaller = "
                               "stream them from disk every step.", low=0,
                               note=" MiB (0: keep every ingredient in memory)"),
}


def modes(options) -> list[str]:
    return ["global", "layer"] if options["learned_mode"] == "both" else [options["learned_mode"]]


def key(options, dish: str) -> dict:
    stats = {"train_statistics": "recalibrated_each_epoch"} if options["recalibrate_bn"] else {}
    # The memory budget only changes where the ingredients are kept, not the soup; each dish is one mode.
    return {"learned_epochs": options["learned_epochs"], "learned_lr": options["learned_lr"], "seed": options["seed"],
            **stats}


def cook(cooking, dish: str) -> Dish:
    import numpy as np
    from soupjax.arithmetic import learned
    from soupjax.io.files import plain
    o = cooking.options
    mode = dish.removeprefix("learned_")
    budget = int(o["memory_budget_mb"] * 2**20) if o["memory_budget_mb"] > 0 else None

    def show(record):
        print(f"{dish}: epoch {record['epoch']} loss {record['loss']:.4f} "
              f"held-out {record['heldout_accuracy']:.4f}", flush=True)

    res = learned.learned(cooking.loaders, cooking.apply_fn, cooking.heldout_batches, mode=mode,
                          epochs=o["learned_epochs"], learning_rate=o["learned_lr"], memory_budget_bytes=budget,
                          seed=o["seed"], on_epoch=show, recalibrate=cooking.recalibrate)
    # Each epoch ends with a held-out evaluation (the history's accuracies).
    cooking.count_heldout(len(res.history))
    if isinstance(res.weights, dict):  # per layer: each ingredient's mean weight over layers
        weights = [float(w) for w in np.mean(np.stack([np.asarray(v) for v in res.weights.values()]), axis=0)]
    else:
        weights = [float(w) for w in np.asarray(res.weights)]
    return Dish(dish, weights, res.variables,
                meta={"history": res.history, "temperature": float(res.temperature),
                      "layer_weights": plain(res.weights) if mode == "layer" else None})


register(Method("learned", "soup", "mixing weights (per ingredient or per layer) trained on the held-out split",
                cook, options=OPTIONS, uses=("seed", "recalibrate_bn"), key=key,
                dish_names=lambda o: [f"learned_{m}" for m in modes(o)], order=40))
