"""The report's rows: one per ingredient and one per dish, as dataclasses built in one place.

``Row.to_dict()`` is the row of ``report.json`` (``soups``), field for field and in the order the
report has always had; ``ingredient_row`` the row of its ``ingredients`` list.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class Cost:
    """What cooking a dish cost: its method, the held-out evaluations it made and its measured peak
    host memory (None for both: cooked by a soupjax that did not count, resumed; unknown, not zero),
    and the hyperparameters it chose."""
    method: str
    heldout_evals: int | None
    peak_memory_mb: float | None
    chosen: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method,
                "heldout_evals": None if self.heldout_evals is None else int(self.heldout_evals),
                "peak_memory_mb": None if self.peak_memory_mb is None else round(float(self.peak_memory_mb), 1),
                "chosen": self.chosen}


@dataclasses.dataclass
class Row:
    """One model (or ensemble) of the report: its accuracies, what it is made of and what it cost.

    ``ingredient`` names the best ingredient in its own row; ``cost`` is set for every dish;
    ``vs_best`` (paired tests against the best ingredient) is filled in once every row is known."""
    name: str
    kind: str
    n_ingredients: int
    forward_passes: int
    heldout: float
    test: dict[str, float]
    shifts: dict[str, float]
    seconds: float
    path: str | None
    weights: list[float] | None
    ingredient: str | None = None
    cost: Cost | None = None
    vs_best: dict[str, Any] | None = None

    @classmethod
    def of(cls, name: str, kind: str, ev: Any, shifts: Sequence[str], *, n: int, passes: int, seconds: float,
           path: str | None, weights: Sequence[float] | None, **more: Any) -> Row:
        """The row of ``ev`` (a ``ModelEval``) on held-out, test and the ``shifts``."""
        return cls(name=name, kind=kind, n_ingredients=int(n), forward_passes=int(passes),
                   heldout=ev.accuracy("heldout"),
                   test={"accuracy": ev.accuracy("test"), "loss": ev.metrics["test"]["loss"]},
                   shifts={s: ev.accuracy(s) for s in shifts}, seconds=float(seconds), path=path,
                   weights=None if weights is None else [float(w) for w in weights], **more)

    @property
    def shift_mean(self) -> float | None:
        return float(np.mean(list(self.shifts.values()))) if self.shifts else None

    def to_dict(self) -> dict[str, Any]:
        """The row as ``report.json`` holds it."""
        out = {"name": self.name, "kind": self.kind,
               "n_ingredients": self.n_ingredients, "forward_passes": self.forward_passes,
               "heldout": self.heldout, "test": self.test, "shifts": self.shifts, "shift_mean": self.shift_mean,
               "seconds": self.seconds, "path": self.path, "weights": self.weights}
        if self.ingredient is not None:
            out["ingredient"] = self.ingredient
        if self.cost is not None:
            out.update(self.cost.to_dict())
        out["vs_best"] = self.vs_best
        return out


def ingredient_row(row: Row, hparams: dict[str, Any]) -> dict[str, Any]:
    """An ingredient's row of the report's ``ingredients`` list: its accuracies and hyperparameters."""
    full = row.to_dict()
    return {k: full[k] for k in ("name", "path", "heldout", "test", "shifts", "shift_mean")} | {"hparams": hparams}


def vs_best(ev: Any, best: Any, shifts: Sequence[str]) -> dict[str, Any]:
    """Paired McNemar tests of ``ev`` against the best ingredient's ``best`` (both ``ModelEval``s) on the
    test set and on all shift images together."""
    from soupjax.report.stats import mcnemar

    def as_dict(r):
        return {"diff": float(r.diff), "p": float(r.p), "n": int(r.n)}

    out = {"test": as_dict(mcnemar(best.correct("test"), ev.correct("test"))), "shift": None}
    if shifts:
        a = np.concatenate([best.correct(s) for s in shifts])
        b = np.concatenate([ev.correct(s) for s in shifts])
        out["shift"] = as_dict(mcnemar(a, b))
    return out
