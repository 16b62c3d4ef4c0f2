"""DARE (Yu et al., ICML 2024): every entry of each displacement τᵢ = θᵢ − θ₀ dropped with probability p
and the kept ones rescaled by 1/(1 − p), then combined linearly (``dare_linear``: θ₀ + λ Σᵢ τ̃ᵢ, λ given
as λ·K as task arithmetic's) or with TIES's sign election and disjoint mean (``dare_ties``: θ₀ + λ ·
disjoint_mean, λ from ``--ties_lambdas``).

The masks are drawn per tensor and ingredient from ``--seed`` (``merging.tensor_rng``), so a merge is
the same however its tensors are read. p and λ are chosen on the held-out split: one evaluation per pair.
"""
from __future__ import annotations

import itertools

from soupjax.methods import Dish, Merge, Method, Option, grid_floats, register

OPTIONS = {
    "dare_drop_rates": Option((0.1, 0.5, 0.9), "DARE: the grid of drop probabilities p.", kind="floats",
                              low=0, high=0.99),
    "dare_scales": Option((0.5, 1.0, 1.5, 2.0), "DARE (linear): the grid of λ·K (θ0 + λ Σ dropped τi).",
                          kind="floats", low=0, low_open=True),
}
COMBINES = ("linear", "ties")


def key(options, dish: str) -> dict:
    # Each dish depends on its own grid only: retuning TIES's λ grid must not recook dare_linear.
    scales = {"dare_scales": options["dare_scales"]} if dish == "dare_linear" else {"ties_lambdas": options["ties_lambdas"]}
    return {"dare_drop_rates": options["dare_drop_rates"], "seed": options["seed"], **scales}


def build(dish, point, init, sources, seed=0):
    """DARE at ``point["p"]`` and ``point["lambda"]``, combined as ``dish`` says (dare_linear, dare_ties)."""
    from soupjax.arithmetic import merging
    p, lam, combine = point["p"], point["lambda"], dish.removeprefix("dare_")

    def one(path, x0, xs):
        # One generator per tensor and ingredient, from the tensor's path: the same masks whatever the order.
        rngs = [merging.tensor_rng(seed, path, i) for i in range(len(xs))]
        return merging.dare(x0, xs, p, lam, rngs, combine=combine)

    return merging.merge_by_tensor(init, sources, one)


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    init, sources = cooking.init_source(), cooking.sources()
    o = cooking.options
    rates = grid_floats(o["dare_drop_rates"])
    if dish == "dare_linear":
        grid = [{"p": p, "lambda": s / k, "scale": s}
                for p, s in itertools.product(rates, grid_floats(o["dare_scales"]))]
    else:
        grid = [{"p": p, "lambda": lam} for p, lam in itertools.product(rates, grid_floats(o["ties_lambdas"]))]
    chosen, variables, records = cooking.choose(dish, grid, lambda point: build(dish, point, init, sources, o["seed"]))
    weight = chosen["lambda"] if dish == "dare_linear" else chosen["lambda"] / k
    return Dish(dish, [weight] * k, variables, chosen=chosen, grid=records)


register(Method("dare", "merge", "random drop-and-rescale of displacements, combined linearly or TIES-style",
                cook, options=OPTIONS, uses=("seed", "ties_lambdas"), key=key,
                dish_names=lambda o: [f"dare_{c}" for c in COMBINES], needs_init=True, order=52,
                merge=Merge(build, {f"dare_{c}": ("p", "lam", "seed") for c in COMBINES})))
