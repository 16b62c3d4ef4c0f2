"""WiSE-FT (Wortsman et al., CVPR 2022): the line θ₀ + α (θ − θ₀) between the shared init and a soup (or
the best ingredient), α from ``--wise_ft_alphas`` (0, 0.1, ..., 1). The paper's point is robustness: the
init keeps what fine-tuning forgets, so a point inside the line can beat both ends under shift.

α is chosen on the held-out split; every point is also evaluated on test and the shift sets for the
curve the report plots (those numbers are never used to choose). One curve per ``--wise_ft_of`` name:
'best_ingredient' or any soup or merge cooked into the same ``--out`` (in ``--recipe all`` every other
method is cooked first). One held-out evaluation per point.
"""
from __future__ import annotations

from soupjax.methods import Dish, Method, Option, grid_floats, register

OPTIONS = {
    "wise_ft_of": Option("best_ingredient,uniform", "WiSE-FT: comma-separated soups (or best_ingredient) to "
                         "interpolate with the init.", kind="str"),
    "wise_ft_alphas": Option(tuple(i / 10 for i in range(11)), "WiSE-FT: the grid of α (0: the init, 1: the soup).",
                             kind="floats", low=0, high=1),
}


def bases(options) -> list[str]:
    """The models named by ``--wise_ft_of``, each once, in the order given."""
    return list(dict.fromkeys(b.strip() for b in options["wise_ft_of"].split(",") if b.strip()))


def key(options, dish: str) -> dict:
    return {"alphas": list(options["wise_ft_alphas"])}


def cook(cooking, dish: str) -> Dish:
    from soupjax.arithmetic import merging
    base = dish.removeprefix("wise_ft_")
    init = cooking.init_source()
    alphas = grid_floats(cooking.options["wise_ft_alphas"])
    source, weights = cooking.dish_source(base)
    # Every collection moves along the line (BatchNorm statistics too: both ends have their own).
    collections = tuple(source.structure)
    curve = {"base": base, "alphas": alphas, "heldout": [], "test": [], "shift_mean": []}

    def build(point):
        # θ0 + α (θ − θ0) is task arithmetic with one ingredient and λ = α, streamed per tensor.
        alpha = point["alpha"]
        return merging.merge_by_tensor(init, [source], lambda path, x0, xs: merging.task_arithmetic(x0, xs, alpha),
                                       merged_collections=collections)

    def seen(point, ev):
        curve["heldout"].append(ev.accuracy("heldout"))
        curve["test"].append(ev.accuracy("test"))
        shifts = [ev.accuracy(s) for s in cooking.shifts]
        curve["shift_mean"].append(sum(shifts) / len(shifts) if shifts else None)

    chosen, variables, evaluation, records = cooking.choose_on_every_split(
        dish, [{"alpha": a} for a in alphas], build, lambda point: f"{dish}-{point['alpha']:g}", seen)
    alpha = chosen["alpha"]
    curve["chosen_alpha"] = alpha
    # The weights say what each ingredient contributes (α times its weight in the base); the models
    # it is made of are the base's, or none at α = 0 (the init).
    return Dish(dish, [alpha * w for w in weights], variables, evaluation=evaluation, chosen=chosen, grid=records,
                meta={"curve": curve, "base": base}, n_used=0 if alpha == 0 else sum(w != 0 for w in weights))


def dish_names(options) -> list[str]:
    return [f"wise_ft_{b}" for b in bases(options)]


register(Method("wise_ft", "merge", "the line between the init and a soup, α on held-out", cook, options=OPTIONS,
                key=key, dish_names=dish_names, needs_init=True, order=95))
