"""Reading a results dict: the fields of a row, the order rows are shown in, and which grid point or
WiSE-FT mixing coefficient was chosen.

Every accessor tolerates a missing or malformed field (returning None or an empty list), because every
field below the top-level keys is optional: results of older runs lack the newer fields, and a recipe
that failed to measure something leaves it out rather than guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from soupjax.report.formatting import MISSING, num

# The name the soup CLI gives the reference row: every Δ in the report is measured against it.
REFERENCE = "best_ingredient"

Row = TypeVar("Row", bound=Mapping[str, Any])


def test_accuracy(entry: Mapping[str, Any]) -> float | None:
    """Test accuracy of a row: ``test`` is ``{'accuracy', 'loss'}`` or, in some callers, a bare number."""
    test = entry.get("test")
    return num(test.get("accuracy")) if isinstance(test, Mapping) else num(test)


def test_loss(entry: Mapping[str, Any]) -> float | None:
    """Test loss of a row, when it was recorded."""
    test = entry.get("test")
    return num(test.get("loss")) if isinstance(test, Mapping) else None


def vs_best(entry: Mapping[str, Any], which: str) -> Any:
    """The paired comparison with the best ingredient on ``which`` ('test' or 'shift'), or None."""
    vs = entry.get("vs_best")
    return vs.get(which) if isinstance(vs, Mapping) else None


def is_reference(entries: Sequence[Mapping[str, Any]]) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate for the reference row among ``entries``: the row named ``best_ingredient``, else the
    first 'individual' row (results written before the name was fixed), else none."""
    named = [e for e in entries if e.get("name") == REFERENCE]
    individual = [e for e in entries if e.get("kind") == "individual"]
    ref = named[0] if named else (individual[0] if individual else None)
    return lambda e: ref is not None and e is ref


def ranked(entries: Iterable[Row], accuracy: Callable[[Row], float | None] = test_accuracy) -> list[Row]:
    """The rows in the order every table of the report uses: the reference first, then the rest by
    ``accuracy`` (test accuracy by default), best first.

    The sort is stable, so rows with equal accuracy keep the order they were cooked in; rows with no
    accuracy come last rather than being dropped. ``experiments/summarize.py`` ranks its mean-over-runs
    rows with this too, so its table reads in the same order as each run's report.
    """
    rows = list(entries)
    reference = is_reference(rows)

    def key(row: Row) -> tuple[int, float]:
        if reference(row):
            return (0, 0.0)
        value = accuracy(row)
        return (1, -value) if value is not None else (2, 0.0)

    return sorted(rows, key=key)


def ranked_soups(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``results['soups']`` in ranking order (see ``ranked``)."""
    return ranked(results.get("soups") or [])


def reference(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The row the Δ columns compare against, when there is one."""
    soups = list(results.get("soups") or [])
    is_ref = is_reference(soups)
    return next((s for s in soups if is_ref(s)), None)


def has_field(entries: Iterable[Mapping[str, Any]], key: str) -> bool:
    """Whether some row gives ``key`` a value: the test for showing an optional column at all."""
    return any(e.get(key) is not None for e in entries)


def ingredient_names(results: Mapping[str, Any]) -> list[str]:
    """The ingredients' names by index (how progressions and soup weights refer to them)."""
    return [str(ing.get("name", i)) for i, ing in enumerate(results.get("ingredients") or [])]


def ingredient_label(ingredient: Any, names: Sequence[str]) -> str:
    """Progressions may name an ingredient by its index (arithmetic/soups.py) or by name (the CLI)."""
    if ingredient is None:
        return MISSING
    if isinstance(ingredient, int) and not isinstance(ingredient, bool) and 0 <= ingredient < len(names):
        return names[ingredient]
    return str(ingredient)


def has_shifts(entries: Iterable[Mapping[str, Any]]) -> bool:
    """Whether some row was evaluated on distribution shifts."""
    return any(num(e.get("shift_mean")) is not None or e.get("shifts") for e in entries)


def shift_splits(results: Mapping[str, Any]) -> list[str]:
    """Shift split names: the declared order first, then any that only appear in the rows."""
    meta_splits = (results.get("meta") or {}).get("splits") or {}
    splits = [str(s) for s in (meta_splits.get("shifts") or [])]
    for entry in list(results.get("soups") or []) + list(results.get("ingredients") or []):
        for split in entry.get("shifts") or {}:
            if split not in splits:
                splits.append(split)
    return splits


def same_value(a: Any, b: Any) -> bool:
    """Equality of two hyperparameter values as they come back from JSON.

    Numbers compare with a tolerance: a grid point 0.1 and a chosen value computed as 1 - 0.9 are the
    same choice. Anything else compares by its JSON text, so lists and dicts compare by value.
    """
    x, y = num(a), num(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def best_index(values: Sequence[float | None]) -> int | None:
    """The index of the largest value (the first of equals: grids are tried in order), or None."""
    scored = [(v, i) for i, v in enumerate(values) if v is not None]
    return max(scored, key=lambda t: (t[0], -t[1]))[1] if scored else None


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One hyperparameter setting a method evaluated on the held-out split."""

    options: Mapping[str, Any]
    heldout: float | None


@dataclasses.dataclass(frozen=True)
class Grid:
    """Every point one row's method tried, and which one it kept.

    ``chosen`` is the index of the kept point; ``recorded`` says whether the row named it (its
    ``chosen`` field) or, with no such field, it is the best held-out point, the rule every method uses.
    """

    name: str
    points: list[GridPoint]
    chosen: int | None
    recorded: bool


def grids(results: Mapping[str, Any]) -> list[Grid]:
    """``results['grids']`` read into ``Grid``s, in the order the methods were cooked."""
    rows = {str(s.get("name")): s for s in results.get("soups") or []}
    out = []
    for name, raw in (results.get("grids") or {}).items():
        points = [GridPoint(p.get("options") if isinstance(p.get("options"), Mapping) else {},
                            num(p.get("heldout")))
                  for p in raw or [] if isinstance(p, Mapping)]
        if not points:
            continue
        chosen = (rows.get(str(name)) or {}).get("chosen")
        if isinstance(chosen, Mapping) and chosen:
            # A point is the chosen one when every option it sets has the chosen value; the chosen dict
            # may also hold settings the grid did not vary.
            index = next((i for i, p in enumerate(points) if p.options and all(
                k in chosen and same_value(v, chosen[k]) for k, v in p.options.items())), None)
            out.append(Grid(str(name), points, index, True))
        else:
            out.append(Grid(str(name), points, best_index([p.heldout for p in points]), False))
    return out


@dataclasses.dataclass(frozen=True)
class WiseFtCurve:
    """Accuracies of (1 − α)·θ₀ + α·base for each α, as fractions; None where not measured."""

    name: str
    base: str
    alphas: list[float]
    heldout: list[float | None]
    test: list[float | None]
    shift_mean: list[float | None]
    chosen: int | None
    recorded: bool

    def has_shifts(self) -> bool:
        """Whether any α was evaluated on the shift sets."""
        return any(v is not None for v in self.shift_mean)


def wise_ft_curves(results: Mapping[str, Any]) -> list[WiseFtCurve]:
    """``results['wise_ft']`` read into ``WiseFtCurve``s; curves with no usable α are left out."""
    out = []
    for name, raw in (results.get("wise_ft") or {}).items():
        if not isinstance(raw, Mapping):
            continue
        alphas = [num(a) for a in raw.get("alphas") or []]
        keep = [i for i, a in enumerate(alphas) if a is not None]
        if not keep:
            continue

        def column(key: str) -> list[float | None]:
            # Lists shorter than ``alphas`` (a curve cut short) read as missing at the end.
            values = list(raw.get(key) or [])
            return [num(values[i]) if i < len(values) else None for i in keep]

        kept = [alphas[i] for i in keep]
        heldout = column("heldout")
        chosen_alpha = num(raw.get("chosen_alpha"))
        if chosen_alpha is not None:
            index = next((i for i, a in enumerate(kept) if same_value(a, chosen_alpha)), None)
            recorded = True
        else:
            index, recorded = best_index(heldout), False
        out.append(WiseFtCurve(str(name), str(raw.get("base") or MISSING), kept, heldout, column("test"),
                               column("shift_mean"), index, recorded))
    return out
