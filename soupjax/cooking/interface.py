"""What a method may use while it cooks (``Cooking``) and what it gives back (``Dish``).

A method of ``soupjax.methods`` sees the ingredients, their evaluations, the counted held-out
evaluator, the shared init as a tensor source and its options: nothing about caches, files or what
was cooked before (the orchestrator, ``cooking.orchestrate``, asks a method only for the dishes still
to cook). Imports only the standard library and numpy at the top: ``soupjax.methods`` imports ``Dish`` from here
before JAX is loaded.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Dish:
    """One result of a method: a model (``variables``) or, for an ensemble, its evaluation (``evaluation``).
    A model may bring ``evaluation`` too, when it is exactly a point the method evaluated on every split
    while choosing it: its logits are then reused instead of evaluated again.

    ``weights`` are per ingredient (the report's 'in soups' column and the ingredients a dish used);
    ``chosen`` the hyperparameters picked on the held-out split and ``grid`` every point tried
    (``{"options": ..., "heldout": ...}``); ``meta`` goes into the dish's meta.json and the report;
    ``forward_passes`` per image at inference; ``n_used`` the models it is made of (default: nonzero weights).
    """
    name: str
    weights: Sequence[float]
    variables: Any = None
    evaluation: Any = None
    chosen: dict[str, Any] | None = None
    grid: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    forward_passes: int = 1
    n_used: int | None = None


def rank(heldout: Sequence[float], ties: str = "index") -> list[int]:
    """Indices by held-out accuracy, best first; equal accuracies in index order (``ties='index'``: the
    earlier first) or in reverse index order (``'official'``, as the official model-soups code, which
    sorts ascending and reverses, and ``soups.greedy(ties='official')`` visit them).

    The one ranking cooking and ``soupjax.api.merge`` use (SLERP's two best, the greedy ensemble's order)."""
    from soupjax.arithmetic.soups import visit_order  # loads JAX: only when a method ranks
    return visit_order(len(heldout), heldout, order="sorted", ties=ties)


def short_options(point: Mapping[str, Any]) -> str:
    """A grid point as a progress line shows it (``density=0.2, lambda=1``)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def named_steps(progression: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """A method's steps with each ingredient index replaced by the ingredient's name (for the report)."""
    from soupjax.io.files import plain
    out = []
    for step in progression:
        step = dict(step)
        if isinstance(step.get("ingredient"), (int, np.integer)):
            step["ingredient"] = names[int(step["ingredient"])]
        out.append(plain(step))
    return out


class Cooking:
    """What a method's ``cook(cooking, dish)`` works with: the ingredients (``names``, ``loaders``), their
    evaluations (``evals``, ``heldout``, ``best``), the held-out evaluator (counted: the report's
    'held-out evals'), the shared init and earlier dishes as tensor sources, and ``options``.

    Built by the orchestrator from an ``evaluations.Evaluations`` (``evaluations``), the ingredients,
    the directory of the shared init (None when no method of this run needs it), the directory soups
    are saved in (``out``) and ``point_key(dish, point)``, what names a curve point's cached evaluation.
    """

    def __init__(self, evaluations: Any, ingredients: Sequence[Any], evals: Sequence[Any],
                 options: Mapping[str, Any], *, init_dir: Path | None, out: Path,
                 point_key: Callable[[str, Mapping[str, Any]], str]):
        self._evaluations = evaluations
        self._ingredients = list(ingredients)
        self._init_dir = init_dir
        self._out = out
        self._point_key = point_key
        self.names = [ing.name for ing in ingredients]
        self.loaders = [ing.load for ing in ingredients]
        self.evals = list(evals)
        self.heldout = [ev.accuracy("heldout") for ev in evals]
        self.best = rank(self.heldout)[0]  # chosen on held-out data, never on test
        self.options = dict(options)
        self.heldout_evals = 0

    # The ingredients and their evaluations.

    def ranked(self, ties: str = "index") -> list[int]:
        """Ingredient indices by held-out accuracy, best first (ties: ``rank``'s)."""
        return rank(self.heldout, ties)

    def sources(self) -> list[Any]:
        """Every ingredient as a tensor source on disk (read one tensor at a time)."""
        from soupjax.io import checkpoints
        return [checkpoints.tensor_source(ing.path) for ing in self._ingredients]

    def ensemble_of(self, indices: Sequence[int]) -> Any:
        """The logit ensemble (a ``ModelEval``) of the ingredients ``indices`` on every split."""
        from soupjax.cooking.evaluations import ensemble_of
        return ensemble_of([self.evals[i] for i in indices], self.splits)

    def named_steps(self, progression: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``progression`` with ingredient indices replaced by names."""
        return named_steps(progression, self.names)

    @property
    def splits(self) -> list[str]:
        """Every split a model is evaluated on: held-out, test, then the shifts."""
        return ["heldout", *self._evaluations.report_splits]

    @property
    def shifts(self) -> list[str]:
        """The distribution-shift splits reported (test and held-out are not among them)."""
        return list(self._evaluations.shifts)

    # Choosing on held-out data (every call counted).

    def heldout_accuracy(self, variables: Mapping[str, Any]) -> float:
        """The held-out accuracy of a candidate: the only accuracy a method may choose by."""
        self.heldout_evals += 1
        return self._evaluations.heldout_accuracy(variables)

    def count_heldout(self, n: int) -> None:
        """Count ``n`` held-out evaluations a method made without ``heldout_accuracy``."""
        self.heldout_evals += int(n)

    def choose(self, name: str, grid: Sequence[Mapping[str, Any]], build: Callable[[Mapping[str, Any]], Any]
               ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
        """Build and score every grid point on held-out; the best one (the first of equals), its model, and
        every point's record ``{"options", "heldout"}``, with a line per point for dish ``name``. Holds the
        best candidate and one more."""
        point, variables, _, records = self._best_of(name, grid, build,
                                                     lambda point, variables: (self.heldout_accuracy(variables), None))
        return point, variables, records

    def choose_on_every_split(self, dish: str, grid: Sequence[Mapping[str, Any]],
                              build: Callable[[Mapping[str, Any]], Any], label: Callable[[Mapping[str, Any]], str],
                              seen: Callable[[Mapping[str, Any], Any], None]
                              ) -> tuple[dict[str, Any], Any, Any, list[dict[str, Any]]]:
        """``choose``, each point evaluated on every split (``evaluate_point``, cached under ``label(point)``)
        and shown to ``seen(point, evaluation)`` (a curve for the report); still chosen by held-out
        accuracy alone. Also returns the chosen point's evaluation, so that it is not evaluated again."""
        def score(point, variables):
            ev = self.evaluate_point(dish, label(point), variables, point)
            seen(point, ev)
            return ev.accuracy("heldout"), ev

        return self._best_of(dish, grid, build, score)

    def _best_of(self, name: str, grid: Sequence[Mapping[str, Any]], build: Callable[[Mapping[str, Any]], Any],
                 score: Callable[[Mapping[str, Any], Any], tuple[float, Any]]
                 ) -> tuple[dict[str, Any], Any, Any, list[dict[str, Any]]]:
        """The one best-of-grid loop: the first point of highest score, its model and what ``score`` said
        besides the accuracy, and every point's record."""
        best: tuple[float, Mapping[str, Any], Any, Any] | None = None
        records = []
        for n, point in enumerate(grid, start=1):
            variables = build(point)
            acc, extra = score(point, variables)
            records.append({"options": dict(point), "heldout": acc})
            print(f"{name}: [{n}/{len(grid)}] {short_options(point)}: held-out {acc:.4f}", flush=True)
            if best is None or acc > best[0]:
                best = (acc, point, variables, extra)
            del variables, extra
        assert best is not None, "an empty grid"  # options are checked non-empty before cooking
        return dict(best[1]), best[2], best[3], records

    def evaluate_point(self, dish: str, label: str, variables: Mapping[str, Any], point: Mapping[str, Any]) -> Any:
        """A point of a curve on every split (a ``ModelEval``, cached under ``label``), counted as one
        held-out evaluation: only its held-out accuracy may choose; test and shift are for the report."""
        self.heldout_evals += 1
        return self._evaluations.evaluate(label, dict(variables), key=self._point_key(dish, point))

    # What learned soups train through: the model, the held-out batches and the recalibration.

    @property
    def apply_fn(self) -> Callable[..., Any]:
        """The model's evaluation function, ``apply_fn(variables, images) -> logits``."""
        return self._evaluations.apply_fn

    def heldout_batches(self) -> Iterator[Any]:
        """The held-out split's evaluation batches, whole: on several processes every process gets the
        batches one process would read (``Evaluations.global_batches``), so that a learned soup takes the
        same steps on each."""
        return self._evaluations.global_batches("heldout")

    @property
    def recalibrate(self) -> Callable[[Mapping[str, Any]], Any] | None:
        """BatchNorm recalibration of a candidate (``--recalibrate_bn``), or None when it is off."""
        return self._evaluations.prepare if self._evaluations.recalibrate_batches else None

    # Models besides the ingredients.

    def init_source(self) -> Any:
        """The shared init as a tensor source (only for methods with ``needs_init``)."""
        from soupjax.io import checkpoints
        if self._init_dir is None:
            raise RuntimeError("the shared init was not located: the method must say needs_init=True")
        return checkpoints.tensor_source(self._init_dir)

    def dish_source(self, name: str) -> tuple[Any, list[float]]:
        """A model by name, as a tensor source on disk: 'best_ingredient', or a soup or merge saved
        earlier in this run's output; and its weights per ingredient."""
        from soupjax.io import checkpoints
        if name == "best_ingredient":
            return (checkpoints.tensor_source(self._ingredients[self.best].path),
                    [float(i == self.best) for i in range(len(self.names))])
        meta = checkpoints.load_meta(self._out / name)
        return checkpoints.tensor_source(self._out / name), list(meta["weights"])
