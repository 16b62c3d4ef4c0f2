"""The registry of recipes: every way soupjax can turn K ingredients into one model (or one ensemble).

One module of this package is one method: it builds a ``Method`` (its name, kind, one-line summary,
its own options with their ranges and help, and ``cook``, the function that makes its dishes) and
calls ``register``. The command line (``soupjax.soup``), ``soupjax.cooking.cook``, the report and the study
enumerate this registry, so a new method is one file here plus its test; nothing else changes.

Modules here import only the standard library and numpy at the top: ``cooking.check_recipe_options`` runs before
JAX is imported, so that a bad flag is refused at once. The heavy work is imported inside ``cook``.

A method's ``cook(cooking, dish)`` receives a ``cooking.interface.Cooking`` (the ingredients, their
evaluations, the held-out evaluator, the shared init as a tensor source, the options) and the name of
one of its dishes (``dish_names``), and returns that ``Dish``, one per result row: learned soups make a
global and a per-layer dish, WiSE-FT one per soup it starts from. Cooking asks only for the dishes not
cooked earlier: a method knows nothing of caches or resuming.

A merge method also says how it builds a model for one point of its grid (``Merge``): cooking builds
every grid point with it, and ``soupjax.api.merge`` builds the one point it is given, so both give the
same model for the same hyperparameters.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from soupjax.cli.errors import InputError
from soupjax.cooking.interface import Cooking, Dish, rank

__all__ = ["Cooking", "Dish", "KINDS", "Merge", "Method", "Option", "SHARED_OPTIONS", "all_options", "define_flags",
           "get", "grid_floats", "method_of_dish", "methods", "names", "rank", "register", "resolve", "wanted"]

KINDS = ("soup", "merge", "ensemble")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method, as the command line spells it (``--NAME``).

    ``kind`` is 'bool', 'int', 'float', 'str' or 'floats' (a comma-separated grid of numbers);
    ``low``/``high`` bound numbers (``low_open``: strictly above ``low``); ``choices`` bound strings.
    """
    default: Any
    help: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    note: str = ""          # said after the range in an error, e.g. " (0: keep every ingredient in memory)"

    def want(self) -> str:
        """The range in words, as an error message says it."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        noun = {"int": "an integer", "floats": "comma-separated numbers, each", "bool": "true or false"}.get(
            self.kind, "a number")
        if self.low is not None and self.high is not None:
            rng = f" in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"
        elif self.low is not None:
            rng = f" {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            rng = ""
        if self.low == 0 and self.low_open and self.high is None:
            rng = ""
            noun = {"int": "a positive integer", "floats": "comma-separated positive numbers"}.get(
                self.kind, "a positive number")
        return noun + rng + self.note

    def problem(self, value: Any) -> bool:
        """True when ``value`` is outside this option's range (or of the wrong type)."""
        if self.kind == "bool":
            return not isinstance(value, bool)
        if self.choices:
            return value not in self.choices
        if self.kind == "str":
            return not isinstance(value, str)
        if self.kind == "int":
            # numpy's integers are numbers.Integral too; a bool is one but is no count.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return True
            return self._out_of_range(float(value))
        values = list(value) if self.kind == "floats" and not isinstance(value, (int, float)) else [value]
        if self.kind == "floats" and not values:
            return True
        for v in values:
            try:
                v = float(v)
            except (TypeError, ValueError):
                return True
            if not math.isfinite(v) or self._out_of_range(v):
                return True
        return False

    def _out_of_range(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return True
        return self.high is not None and v > self.high


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclasses.dataclass(frozen=True)
class Merge:
    """How a merge method builds one model for one point of its grid, for cooking and ``api.merge`` alike.

    ``build(dish, point, init, sources, seed)`` merges ``sources`` (tensor sources, in the order
    ``pick`` gives) from ``init`` at ``point`` (the grid point's values, as the report's grids name
    them); ``hyperparameters[dish]`` are the names ``api.merge`` takes for that point (``lam`` for the
    point's ``lambda``, ``seed`` for the seed); ``pick(heldout)`` the ingredients it merges, by their
    held-out accuracies (default: all, in order; SLERP: the two best, ``rank``'s ties).
    """
    build: Callable[[str, Mapping[str, Any], Any, Sequence[Any], int], Any]
    hyperparameters: Mapping[str, tuple[str, ...]]
    pick: Callable[[Sequence[float]], list[int]] | None = None

    def chosen(self, heldout: Sequence[float]) -> list[int]:
        """The indices of the ingredients merged (by ``pick``, or all)."""
        return self.pick(heldout) if self.pick else list(range(len(heldout)))


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered recipe.

    ``cook(cooking, dish)`` makes the ``Dish`` called ``dish`` (one of ``dish_names(options)``).
    ``options`` are its own; ``uses`` names options another method defines that it reads too (pruned
    soups follow greedy's ``greedy_strict``). ``key(options, dish)`` is what a dish depends on besides
    the ingredients and data (stored with it, compared on a rerun); by default the values of
    ``options`` and ``uses``. ``needs_init``: it works on displacements from the shared init.
    ``saves_model``: its dishes are models saved as checkpoints (an ensemble is not).
    ``in_all``: cooked by ``--recipe all``. ``order``: its place in ``all`` and in listings (a method
    that starts from another's dish, as WiSE-FT does, comes after it). ``merge``: how it builds one
    model for one grid point (``api.merge`` uses it too).
    """
    name: str
    kind: str
    summary: str
    cook: Callable[[Cooking, str], Dish]
    options: Mapping[str, Option] = dataclasses.field(default_factory=dict)
    uses: tuple[str, ...] = ()
    dish_names: Callable[[Mapping[str, Any]], list[str]] | None = None
    key: Callable[[Mapping[str, Any], str], dict[str, Any]] | None = None
    needs_init: bool = False
    saves_model: bool = True
    in_all: bool = True
    order: int = 100
    merge: Merge | None = None

    def dishes(self, options: Mapping[str, Any]) -> list[str]:
        """The names of its dishes with ``options``, in cooking order."""
        return self.dish_names(options) if self.dish_names else [self.name]

    def key_of(self, options: Mapping[str, Any], dish: str) -> dict[str, Any]:
        """What ``dish`` depends on besides the ingredients and data (stored with it)."""
        if self.key:
            return self.key(options, dish)
        return {k: options[k] for k in (*self.options, *self.uses)}

    @property
    def doc(self) -> str:
        """The method's module docstring: what it does and what it costs."""
        module = importlib.import_module(self.cook.__module__)
        return (module.__doc__ or self.summary).strip()


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name and option names must be new)."""
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name}: kind must be one of {KINDS}, got {method.kind!r}")
    if method.name in _REGISTRY or method.name in ("all", "inspect"):
        raise ValueError(f"a method named {method.name!r} is registered already")
    taken = {name for m in _REGISTRY.values() for name in m.options}
    clash = sorted(set(method.options) & (taken | set(SHARED_OPTIONS)))
    if clash:
        raise ValueError(f"method {method.name}: option(s) {', '.join(clash)} belong to another method")
    _REGISTRY[method.name] = method
    return method


# Options of the cooking itself, not of one method (the seed, BatchNorm recalibration, evaluation).
SHARED_OPTIONS: dict[str, Option] = {
    "seed": Option(0, "Seed of every random choice a recipe makes (random greedy order, learned soups, DARE masks).",
                   kind="int", low=0),
    "recalibrate_bn": Option(0, "Recompute BatchNorm statistics of every soup on this many training batches.",
                             kind="int", low=0, note=" (0: no recalibration)"),
    "eval_batch_size": Option(0, "Evaluation batch size (default: the config's).", kind="int", low=0,
                              note=" (0: the config's)"),
}


_discovered = False


def _discover() -> None:
    """Import every module of this package once: each registers its method.

    Whether the registry is empty says nothing: a module imported on its own (``from
    soupjax.methods.greedy_ensemble import select``) registers its method before discovery has run."""
    global _discovered
    if _discovered:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def methods() -> list[Method]:
    """Every registered method, in cooking order."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def names() -> list[str]:
    """The ``--recipe`` names, in cooking order."""
    return [m.name for m in methods()]


def get(name: str) -> Method:
    """The method called ``name`` (``InputError`` listing the others when there is none)."""
    _discover()
    if name not in _REGISTRY:
        raise InputError(f"--recipe={name!r}: must be one of {', '.join([*names(), 'all'])}")
    return _REGISTRY[name]


def method_of_dish(dish: str) -> Method | None:
    """The method that makes the dish called ``dish`` with its default options ('dare_ties': dare), or None."""
    defaults = resolve({})
    return next((m for m in methods() if dish in m.dishes(defaults)), None)


def wanted(recipe: str) -> list[Method]:
    """The methods ``--recipe`` asks for: one, several comma-separated (cooked in the registry's order, so
    that a method comes after the soups it starts from, e.g. wise_ft after greedy), or every one
    ``in_all`` for 'all'."""
    if recipe == "all":
        return [m for m in methods() if m.in_all]
    names_given = [name.strip() for name in recipe.split(",")]
    if len(names_given) == 1:
        return [get(recipe)]
    if "" in names_given or "all" in names_given or "inspect" in names_given:
        raise InputError(f"--recipe={recipe!r}: a list names methods only ({', '.join(names())})")
    asked = {get(name).name for name in names_given}
    return [m for m in methods() if m.name in asked]


def all_options() -> dict[str, Option]:
    """Every option: the shared ones, then each method's, in cooking order."""
    out = dict(SHARED_OPTIONS)
    for m in methods():
        out.update(m.options)
    return out


def resolve(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's value: ``values`` where given, the default otherwise. ``InputError`` naming an
    unknown option, or the first value out of its range, as the command line spells it."""
    options = all_options()
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(options)}")
    out = {}
    for name, option in options.items():
        value = values.get(name, option.default)
        if option.kind == "floats" and isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if option.kind == "floats":
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise InputError(f"--{name}={_shown(values.get(name))}: must be {option.want()}") from None
        if option.problem(value):
            raise InputError(f"--{name}={_shown(value)}: must be {option.want()}")
        out[name] = value
    for m in methods():
        missing = [u for u in m.uses if u not in options]
        if missing:  # a programming error, found by the registry test
            raise ValueError(f"method {m.name} uses unknown option(s) {missing}")
    return out


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_num(v) if isinstance(v, float) else str(v) for v in value)
    return repr(value)


def grid_floats(values: Sequence[float]) -> list[float]:
    """A grid option's values, duplicates dropped, in the order given (the first of equals wins a tie)."""
    out: list[float] = []
    for v in values:
        if float(v) not in out:
            out.append(float(v))
    return out


def define_flags(flags: Any) -> None:
    """Define an absl flag for every option (shared and each method's), typed by its ``kind``."""
    for name, option in all_options().items():
        if option.kind == "bool":
            flags.DEFINE_bool(name, option.default, option.help)
        elif option.kind == "int":
            flags.DEFINE_integer(name, option.default, option.help)
        elif option.kind == "float":
            flags.DEFINE_float(name, option.default, option.help)
        elif option.kind == "floats":
            flags.DEFINE_list(name, [_num(v) for v in option.default], option.help)
        elif option.choices:
            flags.DEFINE_enum(name, option.default, list(option.choices), option.help)
        else:
            flags.DEFINE_string(name, option.default, option.help)
