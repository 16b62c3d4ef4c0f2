"""DARE (Yu et al., ICML 2024): every entry of each displacement τᵢ = θᵢ − θ₀ dropped with probability p
and the kept ones rescaled by 1/(1 − p), then combined linearly (``dare_linear``: θ₀ + λ Σᵢ τ̃ᵢ, λ given
as λ·K as task arithmetic's) or with TIES's sign election and disjoint mean (``dare_ties``: θ₀ + λ ·
disjoint_mean, λ from ``--ties_lambdas``).

The masks are drawn per tensor and ingredient from ``--seed`` (``merging.tensor_rng``), so a merge is
the same however its tensors are read. p and λ are chosen on the held-out split: one evaluation per pair.
"""
from __future__ import annotations

import itertools

from soupjax.methods import Dish, Method, Option, grid_floats, register

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


def cook(cooking):
    from soupjax.arithmetic import merging
    k = len(cooking.names)
    init, sources = cooking.init_source(), cooking.sources()
    o, seed = cooking.options, cooking.options["seed"]
    rates = grid_floats(o["dare_drop_rates"])
    for combine in COMBINES:
        name = f"dare_{combine}"
        if name not in cooking.pending:
            continue
        if combine == "linear":
            grid = [{"p": p, "lambda": s / k, "scale": s} for p, s in itertools.product(rates, grid_floats(o["dare_scales"]))]
        else:
            grid = [{"p": p, "lambda": lam} for p, lam in itertools.product(rates, grid_floats(o["ties_lambdas"]))]

        def build(point, name=name):
            return merging.merge_by_tensor(init, sources, merging.combiner(name, p=point["p"], lam=point["lambda"],
                                                                           seed=seed))

        chosen, variables, records = cooking.choose(name, grid, build)
        weight = chosen["lambda"] if combine == "linear" else chosen["lambda"] / k
        yield Dish(name, [weight] * k, variables, chosen=chosen, grid=records)


register(Method("dare", "merge", "random drop-and-rescale of displacements, combined linearly or TIES-style",
                cook, options=OPTIONS, uses=("seed", "ties_lambdas"), key=key,
                dish_names=lambda o: [f"dare_{c}" for c in COMBINES], needs_init=True, order=52))
