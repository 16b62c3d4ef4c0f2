"""SLERP: spherical linear interpolation between the displacements of the two best ingredients by held-out
accuracy, θ₀ + sin((1−t)Ω)/sin Ω · τₐ + sin(tΩ)/sin Ω · τ_b, per tensor (Ω the angle between the two
tensors' displacements), as mergekit interpolates two models.

t is chosen on the held-out split from ``--slerp_ts`` (0 is the best ingredient, 1 the second best):
one evaluation per point. Only two ingredients are used; ``spherical_mean`` averages all K on the sphere.
The two best are ranked by held-out accuracy, equal accuracies in ingredient order (``methods.rank``),
in cooking and in ``soupjax.api.merge`` alike.
"""
from __future__ import annotations

from soupjax.methods import Dish, Merge, Method, Option, grid_floats, rank, register

OPTIONS = {"slerp_ts": Option((0.0, 0.25, 0.5, 0.75, 1.0), "SLERP: the grid of t between the best (0) and the "
                              "second best (1) ingredient.", kind="floats", low=0, high=1)}


def two_best(heldout) -> list[int]:
    """The two ingredients SLERP interpolates between: the best by held-out accuracy, then the second."""
    return rank(heldout)[:2]


def build(dish, point, init, sources, seed=0):
    """SLERP at ``point["t"]`` between ``sources[0]`` (t = 0) and ``sources[1]`` (t = 1), per tensor."""
    from soupjax.arithmetic import merging
    t = point["t"]
    # Statistics (BatchNorm's) are no displacements: merging.statistics_rule weighs them by t.
    return merging.merge_by_tensor(init, sources, lambda path, x0, xs: merging.slerp(x0, xs[0], xs[1], t),
                                   unmerged=merging.statistics_rule("slerp", t=t))


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    if k == 1:
        return Dish(dish, [1.0], cooking.loaders[0](), meta={"note": "one ingredient: SLERP is that ingredient"})
    a, b = two_best(cooking.heldout)
    init, sources = cooking.init_source(), cooking.sources()
    pair = [sources[a], sources[b]]
    grid = [{"t": t} for t in grid_floats(cooking.options["slerp_ts"])]
    chosen, variables, records = cooking.choose(dish, grid, lambda point: build(dish, point, init, pair))
    weights = [0.0] * k
    weights[a], weights[b] = 1.0 - chosen["t"], chosen["t"]
    return Dish(dish, weights, variables, chosen=chosen, grid=records,
                meta={"pair": [cooking.names[a], cooking.names[b]]}, n_used=2 if 0 < chosen["t"] < 1 else 1)


register(Method("slerp", "merge", "spherical interpolation between the two best ingredients, t on held-out",
                cook, options=OPTIONS, needs_init=True, order=53,
                merge=Merge(build, {"slerp": ("t",)}, pick=two_best)))
