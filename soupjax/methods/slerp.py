"""SLERP: spherical linear interpolation between the displacements of the two best ingredients by held-out
accuracy, θ₀ + sin((1−t)Ω)/sin Ω · τₐ + sin(tΩ)/sin Ω · τ_b, per tensor (Ω the angle between the two
tensors' displacements), as mergekit interpolates two models.

t is chosen on the held-out split from ``--slerp_ts`` (0 is the best ingredient, 1 the second best):
one evaluation per point. Only two ingredients are used; ``spherical_mean`` averages all K on the sphere.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, Option, grid_floats, register

OPTIONS = {"slerp_ts": Option((0.0, 0.25, 0.5, 0.75, 1.0), "SLERP: the grid of t between the best (0) and the "
                              "second best (1) ingredient.", kind="floats", low=0, high=1)}


def cook(cooking) -> list[Dish]:
    from soupjax.arithmetic import merging
    k = len(cooking.names)
    if k == 1:
        return [Dish("slerp", [1.0], cooking.loaders[0](), meta={"note": "one ingredient: SLERP is that ingredient"})]
    a, b = cooking.ranked()[:2]
    init, sources = cooking.init_source(), cooking.sources()
    pair = [sources[a], sources[b]]
    grid = [{"t": t} for t in grid_floats(cooking.options["slerp_ts"])]

    def build(point):
        # Statistics (BatchNorm's) are no displacements: merging.statistics_rule weighs them by t.
        return merging.merge_by_tensor(init, pair, merging.combiner("slerp", t=point["t"]),
                                       unmerged=merging.statistics_rule("slerp", t=point["t"]))

    chosen, variables, records = cooking.choose("slerp", grid, build)
    weights = [0.0] * k
    weights[a], weights[b] = 1.0 - chosen["t"], chosen["t"]
    return [Dish("slerp", weights, variables, chosen=chosen, grid=records,
                 meta={"pair": [cooking.names[a], cooking.names[b]]}, n_used=2 if 0 < chosen["t"] < 1 else 1)]


register(Method("slerp", "merge", "spherical interpolation between the two best ingredients, t on held-out",
                cook, options=OPTIONS, needs_init=True, order=53))
