"""TIES merging (Yadav et al., NeurIPS 2023): each displacement τᵢ = θᵢ − θ₀ trimmed to its top-k% entries
by magnitude, a sign elected per parameter (the sign of the trimmed displacements' sum), and the mean of
the entries that agree with it (the disjoint mean), scaled by λ: θ₀ + λ · disjoint_mean.

k (``--ties_densities``) and λ (``--ties_lambdas``) are chosen together on the held-out split: one
held-out evaluation per pair. With k = 100% and no sign conflict, TIES with λ is task arithmetic with λ/K.
"""
from __future__ import annotations

import itertools

from soupjax.methods import Dish, Merge, Method, Option, grid_floats, register

OPTIONS = {
    "ties_densities": Option((0.1, 0.2, 0.5, 1.0), "TIES: the grid of fractions of each displacement kept "
                             "(top-k by magnitude).", kind="floats", low=0, high=1, low_open=True),
    "ties_lambdas": Option((0.5, 1.0, 1.5, 2.0), "TIES and DARE-TIES: the grid of λ scaling the disjoint mean "
                           "(1: a mean).", kind="floats", low=0, low_open=True),
}


def build(dish, point, init, sources, seed=0):
    """TIES at ``point["density"]`` and ``point["lambda"]``, per tensor."""
    from soupjax.arithmetic import merging
    density, lam = point["density"], point["lambda"]
    return merging.merge_by_tensor(init, sources, lambda path, x0, xs: merging.ties(x0, xs, density, lam))


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    init, sources = cooking.init_source(), cooking.sources()
    o = cooking.options
    grid = [{"density": d, "lambda": lam}
            for d, lam in itertools.product(grid_floats(o["ties_densities"]), grid_floats(o["ties_lambdas"]))]
    chosen, variables, records = cooking.choose(dish, grid, lambda point: build(dish, point, init, sources))
    return Dish(dish, [chosen["lambda"] / k] * k, variables, chosen=chosen, grid=records)


register(Method("ties", "merge", "trim to top-k%, elect a sign per parameter, disjoint mean; k and λ on held-out",
                cook, options=OPTIONS, needs_init=True, order=51,
                merge=Merge(build, {"ties": ("density", "lam")})))
