"""A look inside a set of ingredients before (or instead of) cooking them.

* the angle between every pair of fine-tuning displacements, theta_i - theta_0 and theta_j - theta_0,
  where theta_0 is the shared init (rebuilt from the config and checked against the fingerprint);
  the paper finds soups help most when these angles are large but the models stay in one basin;
* L2 distances between ingredients (computed from those displacements, see displacement_geometry);
* held-out accuracy along the straight line between pairs of the best ingredients (linear mode
  connectivity: a dip in the middle means the pair would not soup well).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict


def _flat_f32(variables: dict[str, Any]) -> np.ndarray:
    """The parameters (not BatchNorm statistics) as one float32 vector, in a fixed leaf order."""
    leaves = jax.tree_util.tree_leaves(variables["params"])
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves])


# Columns per float64 block: bounds the float64 copy to K x 2^20 values whatever the model's size.
_BLOCK = 1 << 20


def displacement_geometry(deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(angles in degrees, L2 distances) between the ingredients, from their displacements.

    ``deltas`` is (K, P): row i is theta_i - theta_0. The distance ||theta_i - theta_j|| is taken as
    ||delta_i - delta_j||, pair by pair, never as |a|^2 + |b|^2 - 2ab: fine-tuned models are large
    vectors a small distance apart, and that form subtracts numbers ~|theta|^2 to find one ~|d|^2
    (float32 vectors of norm 1,400 at distance 0.02 all came out at distance 0). Sums are in float64.
    """
    k, p = deltas.shape
    gram = np.zeros((k, k), np.float64)
    sq_dist = np.zeros((k, k), np.float64)
    for start in range(0, p, _BLOCK):
        block = np.asarray(deltas[:, start:start + _BLOCK], np.float64)
        gram += block @ block.T
        for i in range(k):
            sq_dist[i, i + 1:] += np.sum(np.square(block[i + 1:] - block[i]), axis=1)
    norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    cos = np.clip(gram / np.outer(norms, norms), -1.0, 1.0)
    angles = np.degrees(np.arccos(cos))
    np.fill_diagonal(angles, 0.0)
    l2 = np.sqrt(sq_dist + sq_dist.T)
    return angles, l2


def inspect(ingredients_dir: Path, out: Path, *, config: ConfigDict | None = None, data_dir: str | None = None,
            allow_mixed_init: bool = False,
            pairs: int = 3, points: int = 11, eval_batch_size: int = 0, recalibrate_bn: int = 0) -> dict[str, Any]:
    """Compute the angles, distances and interpolation curves; write inspect.md/.json and plots."""
    from soupjax.cooking import preflight
    from soupjax.cli.errors import InputError
    from soupjax.cooking.evaluations import Evaluations
    from soupjax.cooking.orchestrate import check_recipe_options, check_writable, ingredients_config

    check_recipe_options(eval_batch_size=eval_batch_size, recalibrate_bn=recalibrate_bn)
    if pairs < 1 or points < 2:
        raise InputError(f"--inspect_pairs={pairs} --inspect_points={points}: need at least 1 pair and 2 points")
    ingredients = preflight.gather(ingredients_dir, allow_mixed_init=allow_mixed_init)
    possible = len(ingredients) * (len(ingredients) - 1) // 2
    if possible == 0:
        raise InputError(f"inspect compares ingredients pairwise, and {ingredients_dir} has one usable ingredient "
                         f"({ingredients[0].name}): fine-tune at least two")
    if pairs > possible:
        raise InputError(f"--inspect_pairs={pairs}: {len(ingredients)} ingredients make only {possible} pair(s)")
    config = ingredients_config(ingredients, config, data_dir)
    check_writable(out)
    # Only now: the model and data modules take seconds to import, the checks above none.
    from soupjax import report
    from soupjax.arithmetic import soups
    from soupjax.io import checkpoints
    from soupjax.training.shared_init import locate_start, start_problem
    metas = [ing.meta for ing in ingredients]
    # Angles are between displacements from the start the ingredients recorded (init and head, checked
    # by fingerprint), the θ0 the merge methods use. Without one shared start (from-scratch runs with
    # --allow_mixed_init, ingredients that recorded none) there are no angles to give, but distances and
    # the interpolation lines (the loss barrier between such runs) still mean what they say.
    no_start = start_problem(metas)
    # Before the K ingredients are loaded: a start that does not match what they recorded is refused at once.
    theta0 = None
    if not no_start:
        # The start training wrote beside the ingredients (or, for older ones, rebuilt and kept in out/cache).
        where, problem = locate_start(ingredients_dir, metas, config, None, Path(out) / "cache")
        if problem:
            raise InputError(problem)
        theta0 = _flat_f32(checkpoints.load_variables(where))
    # K vectors of P float32 parameters: fine for the models this is meant for; a streamed Gram matrix
    # would be needed for K x ViT-L.
    deltas = np.stack([_flat_f32(ing.load()) for ing in ingredients])
    # In place: theta_i - theta_0 of two float32 numbers this close is exact (Sterbenz), and no second
    # K x P array is made. Distances do not depend on the point subtracted; without θ0, ingredient 0
    # keeps the numbers small.
    deltas -= deltas[0].copy() if theta0 is None else theta0
    angles, l2 = displacement_geometry(deltas)
    if no_start:
        print(f"inspect: no angles between fine-tuning updates, {no_start}; distances and interpolation only",
              flush=True)

    # With BatchNorm, points on the line need their own statistics, or every midpoint looks collapsed.
    kitchen = Evaluations(config, out, shifts=[], eval_batch_size=eval_batch_size, recalibrate_batches=recalibrate_bn,
                          activation=ingredients[0].meta.get("activation"))
    heldout = [ing.heldout_accuracy or 0.0 for ing in ingredients]
    ranked = list(np.argsort(heldout)[::-1])
    chosen = list(itertools.combinations(ranked[: max(2, int(np.ceil((1 + np.sqrt(1 + 8 * pairs)) / 2)))], 2))[:pairs]
    alphas = np.linspace(0.0, 1.0, points)
    lines = []
    for i, j in chosen:
        a, b = ingredients[i].load(), ingredients[j].load()
        accs = [kitchen.heldout_accuracy(soups.interpolate(a, b, float(alpha))) for alpha in alphas]
        lines.append({"a": ingredients[i].name, "b": ingredients[j].name, "alphas": alphas.tolist(), "heldout": accs})
        print(f"interpolation {ingredients[i].name} -> {ingredients[j].name}: "
              + " ".join(f"{x:.3f}" for x in accs), flush=True)
    result = {"names": [ing.name for ing in ingredients], "angles_deg": None if no_start else angles.tolist(),
              "l2": l2.tolist(), "interpolation": lines}
    if no_start:
        result["no_angles"] = no_start
    out.mkdir(parents=True, exist_ok=True)
    report.write_inspect(result, out)
    print(report.inspect_table(result), flush=True)
    return result
