"""Model Stock (Jang et al., ECCV 2024): per layer (here: per tensor), the mean of the K fine-tuned weights
pulled back towards the init by t = K cos θ / (1 + (K − 1) cos θ), θ the mean angle between the layer's
displacements: θ = t · mean θᵢ + (1 − t) · θ₀. Ingredients that agree (cos θ → 1) keep their mean; ones
that point in unrelated directions (cos θ → 0) fall back to the init.

Nothing to choose: no held-out evaluation. The ratios t are in the dish's meta.json (``ratios``).
"""
from __future__ import annotations

from soupjax.methods import Dish, Merge, Method, register


def merged_with_ratios(init, sources) -> tuple[dict, dict[str, float]]:
    """The Model Stock merge, per tensor, and each merged tensor's ratio t by its path."""
    from soupjax.arithmetic import merging
    ratios: dict[str, float] = {}

    def one(path, x0, xs):
        merged, ratios[path] = merging.model_stock_with_ratio(x0, xs)
        return merged

    return merging.merge_by_tensor(init, sources, one), ratios


def build(dish, point, init, sources, seed=0):
    """The Model Stock merge (``point`` is empty)."""
    return merged_with_ratios(init, sources)[0]


def cook(cooking, dish: str) -> Dish:
    import numpy as np
    k = len(cooking.names)
    variables, ratios = merged_with_ratios(cooking.init_source(), cooking.sources())
    values = np.array(list(ratios.values()) or [1.0])
    summary = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    # Each ingredient's weight is t/K; the rest, 1 - t, is the init's (shown as the mean over tensors).
    return Dish(dish, [summary["mean"] / k] * k, variables, chosen={"t_mean": round(summary["mean"], 4)},
                meta={"ratios": ratios, "ratio_summary": summary})


register(Method("model_stock", "merge", "the mean pulled towards the init per layer by the angle between "
                "displacements", cook, needs_init=True, order=55, merge=Merge(build, {"model_stock": ()})))
