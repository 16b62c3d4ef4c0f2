"""Task arithmetic (Ilharco et al., ICLR 2023): θ₀ + λ Σᵢ τᵢ, the displacements τᵢ = θᵢ − θ₀ from the
shared init summed and scaled.

λ is chosen on the held-out split from ``--task_arithmetic_scales``, given as λ·K so that the grid means
the same for any K: 1 is the uniform soup, below 1 a step back towards the init, above 1 beyond the
mean. One held-out evaluation per grid point; each candidate is merged tensor by tensor from disk.
"""
from __future__ import annotations

from soupjax.methods import Dish, Merge, Method, Option, grid_floats, register

OPTIONS = {"task_arithmetic_scales": Option(
    (0.5, 0.75, 1.0, 1.25, 1.5, 2.0), "Task arithmetic: the grid of λ·K tried on held-out "
    "(θ0 + λ Σ τi; 1 is the uniform soup).", kind="floats", low=0, low_open=True)}


def build(dish, point, init, sources, seed=0):
    """θ0 + λ Σ τi at ``point["lambda"]``, per tensor."""
    from soupjax.arithmetic import merging
    lam = point["lambda"]
    return merging.merge_by_tensor(init, sources, lambda path, x0, xs: merging.task_arithmetic(x0, xs, lam))


def cook(cooking, dish: str) -> Dish:
    k = len(cooking.names)
    init, sources = cooking.init_source(), cooking.sources()
    grid = [{"lambda": s / k, "scale": s} for s in grid_floats(cooking.options["task_arithmetic_scales"])]
    chosen, variables, records = cooking.choose(dish, grid, lambda point: build(dish, point, init, sources))
    return Dish(dish, [chosen["lambda"]] * k, variables, chosen=chosen, grid=records)


register(Method("task_arithmetic", "merge", "θ0 + λ Σ τi, λ chosen on held-out", cook, options=OPTIONS,
                needs_init=True, order=50, merge=Merge(build, {"task_arithmetic": ("lam",)})))
