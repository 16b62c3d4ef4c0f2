"""Cooking, start to end: gather and check the ingredients, evaluate them, run the methods, finish each
dish (evaluate, save, report row) and write the report.

The library behind ``python -m soupjax.soup`` (and ``soupjax.experiment``): ``cook(recipe, ...)``
does the whole job and returns the results the report is made from. The recipes are the methods of
``soupjax.methods``; each is asked for the dishes still to cook, one at a time (``cook(cooking,
dish)``, with a ``cooking.interface.Cooking``), and every dish is timed, measured (peak host memory),
evaluated, saved and reported here. Every evaluation of an ingredient and every cooked soup is kept
under ``out`` (``cache/`` and one directory per soup), so an interrupted run resumes where it stopped:
a dish found there, cooked from the same ingredients and options (``provenance``), is reused and its
method is not asked for it.

A rerun into the same ``out`` with other ingredients or options is refused before any work, naming what
differs, unless ``overwrite`` is given: a soup or report is never silently replaced by a different one.
Every file is written under a temporary name and renamed into place (``soupjax.io.files``).

Bad options and unusable inputs raise ``InputError`` before anything is written; ``check_recipe_options``
needs no import of JAX, so the command line refuses a bad flag at once.

With one ingredient (or one left after NaN/Inf ingredients are dropped) every recipe is that
ingredient: the uniform, greedy and pruned soups are it, the learned soup is it with weight 1 and the
ensemble is that one model. A note says so; the report is written as usual.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ml_collections import ConfigDict

from soupjax.cli import preemption
from soupjax.cli.errors import InputError
from soupjax.cooking import provenance as prov
from soupjax.cooking.interface import Cooking, Dish
from soupjax.cooking.rows import Cost, Row, ingredient_row, vs_best
from soupjax.io import files
from soupjax.io.files import plain


def check_recipe_options(*, recipe: str | None = None, **options: Any) -> dict[str, Any]:
    """Every option's value (the defaults filled in), or ``InputError`` naming the first one out of its
    range as the command line spells it (``--NAME=VALUE: must be ...``), an unknown option or recipe.

    Imports nothing heavy: the command line calls it before JAX loads. ``recipe=None`` skips that check.
    """
    from soupjax import methods
    if recipe is not None:
        methods.wanted(recipe)
    return methods.resolve(options)


def ingredients_config(ingredients: Sequence[Any], config: ConfigDict | None, data_dir: str | None) -> ConfigDict:
    """The ingredients' own config (or ``config``), with ``data_dir`` replaced when given."""
    config = copy.deepcopy(config) if config is not None else ConfigDict(ingredients[0].meta["config"])
    if data_dir:
        config.data.data_dir = data_dir
    return config


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be made in it (``files.writable_problem``), or ``InputError``
    saying why not.

    Checked before any work: hours of cooking must not end at the first write.
    """
    from soupjax.io import files
    if out.exists() and not out.is_dir():
        raise InputError(f"the output directory {out} (--out) is a file, not a directory")
    problem = files.writable_problem(out, create=True)
    if problem:
        raise InputError(f"the output directory {out} (--out) is not writable: {problem}; choose another --out")


def check_apart(ingredients_dir: Path, out: Path) -> None:
    """``InputError`` when ``out`` is the ingredients' directory, lies inside it, or holds it: a soup
    saved among the ingredients would be taken for one by every later cook."""
    ingredients, soups = files.resolve(ingredients_dir), files.resolve(out)
    if soups == ingredients or ingredients in soups.parents or soups in ingredients.parents:
        raise InputError(f"--out={out} and --ingredients={ingredients_dir} overlap: soups written among the "
                         "ingredients would become ingredients; choose an --out outside the ingredients' directory")


def check_shifts(data: Any, config: ConfigDict, shifts: Sequence[str] | None) -> list[str]:
    """The shift splits to report (``shifts``, or the data set's); ``InputError`` for an unknown name."""
    if shifts is None:
        return list(data.shift_splits(config.data))
    for split in shifts:
        try:
            data.logit_projection(config.data, split)  # validates the name, reads nothing
        except ValueError as e:
            raise InputError(f"--shifts: {e}") from e
    return list(shifts)


@dataclasses.dataclass
class Plan:
    """A run, checked: what to cook from what, and what it will be compared with on a rerun."""
    recipe: str
    ingredients_dir: Path
    out: Path
    ingredients: list[Any]
    config: ConfigDict
    options: dict[str, Any]
    wanted: list[Any]            # the methods asked for, in cooking order
    shifts: list[str]
    keys: prov.DishKeys
    provenance: dict[str, Any]
    command: str

    @property
    def names(self) -> list[str]:
        return [ing.name for ing in self.ingredients]

    @property
    def dish_count(self) -> int:
        return sum(len(m.dishes(self.options)) for m in self.wanted)


def plan(recipe: str, ingredients_dir: Path, out: Path, *, config: ConfigDict | None, allow_mixed_init: bool,
         shifts: Sequence[str] | None, data_dir: str | None, command: str, overwrite: bool,
         options: Mapping[str, Any]) -> Plan:
    """Every check before the first write: options, the ingredients, the output directory and what it
    holds already (``InputError`` for the first problem)."""
    from soupjax import methods
    o = check_recipe_options(recipe=recipe, **options)
    wanted = methods.wanted(recipe)
    out = files.as_path(out)
    from soupjax.cooking import preflight
    # First, as it imports only JAX and orbax: unusable ingredients are refused before TensorFlow loads.
    ingredients = preflight.gather(ingredients_dir, allow_mixed_init=allow_mixed_init)
    check_apart(ingredients_dir, out)

    from soupjax import data
    from soupjax.config.base import fingerprint
    from soupjax.training import shared_init
    config = ingredients_config(ingredients, config, data_dir)
    shift_names = check_shifts(data, config, shifts)
    init = ingredients[0].meta.get("init_fingerprint")
    # What a soup is made from: the ingredients by name and meta.json fingerprint (a retrained
    # ingredient of the same name is another ingredient), the init, the evaluation data.
    ingredient_meta = {ing.name: fingerprint(ing.meta) for ing in ingredients}
    # The batch size is in too: a learned soup takes one step per held-out batch, and recalibration
    # reads that many images per batch.
    common = {"ingredients": [str(ing.path) for ing in ingredients], "ingredient_meta": ingredient_meta,
              "init": init, "data": data.eval_fingerprint(config.data), "recalibrate_bn": o["recalibrate_bn"],
              "eval_batch": o["eval_batch_size"] or config.eval_batch_size}
    method_of = {dish: m for m in methods.methods() for dish in m.dishes(o)}
    keys = prov.DishKeys(o, method_of, common, shared_init.start_key([ing.meta for ing in ingredients], config))
    dishes = [(m, dish) for m in wanted for dish in m.dishes(o)]
    prov.check_wise_ft_bases(o, wanted, method_of, {d for _, d in dishes}, out, keys.key)
    soup_names = [d for m, d in dishes if m.saves_model]
    provenance = plain({
        "recipe": recipe, "ingredients": sorted(ing.name for ing in ingredients), "ingredient_meta": ingredient_meta,
        "init": init, "data": data.eval_fingerprint(config.data), "model": fingerprint(config.model),
        "shifts": shift_names, "recalibrate_bn": o["recalibrate_bn"], "learned_mode": o["learned_mode"],
        "options": {d: keys.own_options(d) for d in soup_names}})
    if not overwrite:
        prov.refuse_changed_outputs(out, provenance, {d: keys.key(d) for d in soup_names})
    check_writable(out)
    return Plan(recipe, files.as_path(ingredients_dir), out, ingredients, config, o, wanted, shift_names, keys, provenance,
                command)


class Kitchen:
    """One run's evaluations, rows and report extras while its methods cook (``cook`` drives it)."""

    def __init__(self, plan: Plan):
        from soupjax.cooking.evaluations import Evaluations
        self.plan = plan
        self.evaluations = Evaluations(plan.config, plan.out, shifts=plan.shifts,
                                       eval_batch_size=plan.options["eval_batch_size"],
                                       recalibrate_batches=plan.options["recalibrate_bn"],
                                       activation=plan.ingredients[0].meta.get("activation"))
        self.rows: list[Row] = []
        self.soup_evals: dict[str, Any] = {}
        self.extras: dict[str, dict[str, Any]] = {"progressions": {}, "learned_history": {}, "grids": {},
                                                  "wise_ft": {}}

    def start_dir(self, active: list[Any]) -> tuple[Path | None, list[Any]]:
        """The shared start's directory when a method needs it, and the methods that can be cooked:
        without the start, ``--recipe all`` leaves out those needing it (a note says why) and a single
        such method is refused with the reason."""
        if not any(m.needs_init for m in active):
            return None, active
        from soupjax.training import shared_init
        p = self.plan
        where, problem = shared_init.locate_start(p.ingredients_dir, [ing.meta for ing in p.ingredients], p.config,
                                                  self.evaluations.model, self.evaluations.cache)
        if not problem:
            return where, active
        if p.recipe != "all":
            raise InputError(f"--recipe={p.recipe} works on the displacements from the shared init, which is "
                             f"unknown: {problem}")
        needing = [m.name for m in active if m.needs_init]
        print(f"soupjax.soup: note: {', '.join(needing)} left out: they work on the displacements from the "
              f"shared init, which is unknown: {problem}", flush=True)
        return None, [m for m in active if not m.needs_init]

    def collect(self, name: str, meta: Mapping[str, Any], grid: Any) -> None:
        """A dish's progression, training history, curve and grid, for the report's sections."""
        for field, into in (("progression", "progressions"), ("history", "learned_history"), ("curve", "wise_ft")):
            if meta.get(field):
                self.extras[into][name] = meta[field]
        if grid:
            self.extras["grids"][name] = grid

    def finish(self, cooking: Cooking, method: Any, dish: Dish, seconds: float, heldout_evals: int,
               peak_mb: float | None) -> None:
        """Evaluate a dish, save it (a model) as an ingredient-format checkpoint, add its report row."""
        from soupjax import data
        from soupjax.cooking.evaluations import known_logits
        from soupjax.io import checkpoints
        p, name, weights = self.plan, dish.name, [float(w) for w in dish.weights]
        n_used = dish.n_used if dish.n_used is not None else sum(w != 0 for w in weights)
        path = None
        if dish.variables is not None:
            variables = self.evaluations.prepare(dish.variables)
            # A dish chosen from evaluated points (WiSE-FT's line) brings its evaluation: not run again.
            known = dish.evaluation.arrays() if dish.evaluation is not None else \
                known_logits(variables, weights, cooking.loaders, cooking.evals)
            ev = self.evaluations.evaluate(f"soup-{name}", variables, key=p.keys.fingerprint(name), prepared=True,
                                           seed_arrays=known)
            meta = {"name": name, "recipe": name, "method": method.name, "kind": method.kind,
                    "config": p.config.to_dict(), "init_fingerprint": p.keys.common["init"],
                    "data_fingerprint": data.eval_fingerprint(p.config.data), "options": p.keys.key(name),
                    "ingredients": p.names, "used": [n for n, w in zip(p.names, weights) if w != 0],
                    "weights": weights, "metrics": ev.metrics, "seconds": seconds,
                    "recalibrated_bn_batches": p.options["recalibrate_bn"], "heldout_evals": heldout_evals,
                    "peak_memory_mb": peak_mb, "chosen": dish.chosen, "grid": dish.grid,
                    "forward_passes": dish.forward_passes, "n_used": n_used, **dish.meta}
            path = p.out / name
            with preemption.saving():  # a signal now waits for the soup to be whole
                checkpoints.save_ingredient(path, variables, plain(meta))
        else:
            ev = dish.evaluation
        self.soup_evals[name] = ev
        self.collect(name, dish.meta, dish.grid)
        self.rows.append(Row.of(name, method.kind, ev, p.shifts, n=n_used, passes=dish.forward_passes,
                                seconds=seconds, path=None if path is None else str(path), weights=weights,
                                cost=Cost(method.name, heldout_evals, peak_mb, dish.chosen)))

    def reuse(self, method: Any, name: str, meta: Mapping[str, Any]) -> None:
        """A dish cooked earlier from the same ingredients and options (``meta``, its meta.json): its
        evaluation (cached) and its report row, as when it was cooked."""
        from soupjax.io import checkpoints
        soup_dir = self.plan.out / name
        ev = self.evaluations.evaluate(f"soup-{name}", None, lambda: checkpoints.load_variables(soup_dir),
                                       key=self.plan.keys.fingerprint(name), prepared=True)
        self.soup_evals[name] = ev
        self.collect(name, meta, meta.get("grid"))
        # A soup saved by a soupjax that did not record its costs: unknown (None), not zero.
        self.rows.append(Row.of(name, method.kind, ev, self.plan.shifts, n=meta.get("n_used", len(meta["used"])),
                                passes=meta.get("forward_passes", 1), seconds=meta["seconds"], path=str(soup_dir),
                                weights=meta["weights"], cost=Cost(method.name, meta.get("heldout_evals"),
                                                                   meta.get("peak_memory_mb"), meta.get("chosen"))))
        print(f"{name}: cooked earlier, reused ({soup_dir})", flush=True)

    def cook_method(self, cooking: Cooking, method: Any, vote: preemption.StopVote) -> None:
        """Every dish of ``method`` not cooked earlier, one call of ``method.cook(cooking, dish)`` each,
        timed, its held-out evaluations counted and its peak memory measured; after each, a stop on
        SIGTERM or Ctrl-C when ``vote`` says so."""
        from soupjax.devices.memory import PeakMemory
        for name in method.dishes(self.plan.options):
            meta = prov.cooked_earlier(self.plan.out, name, self.plan.keys.key(name)) if method.saves_model else None
            if meta is not None:
                self.reuse(method, name, meta)
            else:
                before, started = cooking.heldout_evals, time.time()
                with PeakMemory() as peak:
                    dish = method.cook(cooking, name)
                self.finish(cooking, method, dish, time.time() - started, cooking.heldout_evals - before,
                            peak.mebibytes)
            stop_if_agreed(vote, lambda: f"after dish {len(self.rows)} of {self.plan.dish_count} ({name}): every "
                                         f"soup cooked is kept in {self.plan.out}")


def cook(recipe: str, ingredients_dir: Path, out: Path, *, config: ConfigDict | None = None,
         allow_mixed_init: bool = False, shifts: Sequence[str] | None = None, data_dir: str | None = None,
         command: str = "", overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Run ``recipe`` (a name in ``soupjax.methods``, or 'all') on the ingredients in ``ingredients_dir``;
    write soups and the report to ``out``.

    ``options`` are the methods' and the shared ones (``methods.all_options()``: e.g. ``seed``,
    ``greedy_order``, ``learned_epochs``, ``ties_densities``), by the names the command line uses.
    Soups and a report already in ``out`` are reused when they were cooked from the same ingredients
    and options, refused (``InputError``) when not, unless ``overwrite``. Every check runs before the
    first write. Methods that work on displacements from the shared init need it: when it cannot be
    had, ``--recipe all`` leaves them out with a note and a single such method is refused with the
    reason. Returns the results dict that the report is made from.
    """
    p = plan(recipe, ingredients_dir, out, config=config, allow_mixed_init=allow_mixed_init, shifts=shifts,
             data_dir=data_dir, command=command, overwrite=overwrite, options=options)
    if len(p.ingredients) == 1:
        print(f"soupjax.soup: note: one ingredient ({p.names[0]}): every soup is that ingredient (uniform, greedy "
              "and pruned: itself; learned: itself with weight 1; ensemble: that one model)", flush=True)
    kitchen = Kitchen(p)
    print(f"soupjax.soup: {len(p.ingredients)} ingredients from {ingredients_dir}; model {p.config.model.name}, "
          f"data {p.config.data.name}; report splits: {', '.join(kitchen.evaluations.report_splits)}", flush=True)
    # SIGTERM or Ctrl-C (cli/preemption): the evaluation or dish under way is finished and kept, and the
    # cook stops there, every process at the same one; the rerun reuses what is kept.
    vote = preemption.StopVote(lagged=False)
    with preemption.boundaries(after=f"after the last dish, before the report: every soup is kept in {p.out}"):
        # 1. Every ingredient on every split, one at a time (cached). Recalibration applies to soups only.
        evals = []
        for ing in p.ingredients:
            evals.append(kitchen.evaluations.evaluate_ingredient(ing))
            stop_if_agreed(vote, lambda: f"after evaluating {len(evals)} of {len(p.ingredients)} ingredients "
                                         f"(kept in {p.out / 'cache'})")
        # 2. The shared init, when a method needs it: without it those methods cannot be cooked.
        init_dir, active = kitchen.start_dir(list(p.wanted))
        cooking = Cooking(kitchen.evaluations, p.ingredients, evals, p.options, init_dir=init_dir, out=p.out,
                          point_key=p.keys.point_fingerprint)
        # 3. Every method, in the registry's order.
        for method in active:
            kitchen.cook_method(cooking, method, vote)
    return _write_report(p, kitchen, evals, cooking.best, active)


def stop_if_agreed(vote: preemption.StopVote, where: Callable[[], str]) -> None:
    """At a boundary of cooking: ``Preempted`` (saying ``where()``) when every process agrees to stop."""
    signum = vote()
    if signum:
        raise preemption.stop(signum, where())


def _write_report(p: Plan, kitchen: Kitchen, evals: Sequence[Any], best: int, active: Sequence[Any]
                  ) -> dict[str, Any]:
    """The results (ingredient rows, the best ingredient's row, every dish's row with its paired tests
    against the best ingredient, the sections' extras), written as the report; returned."""
    from soupjax import report
    ingredient_rows = [ingredient_row(Row.of(ing.name, "individual", ev, p.shifts, n=1, passes=1, seconds=0.0,
                                             path=str(ing.path), weights=None), ing.meta.get("hparams", {}))
                       for ing, ev in zip(p.ingredients, evals)]
    one_hot = [1.0 if i == best else 0.0 for i in range(len(p.names))]
    rows = [Row.of("best_ingredient", "individual", evals[best], p.shifts, n=1, passes=1, seconds=0.0,
                   path=str(p.ingredients[best].path), weights=one_hot, ingredient=p.names[best]), *kitchen.rows]
    for row in rows[1:]:
        row.vs_best = vs_best(kitchen.soup_evals[row.name], evals[best], p.shifts)
    results = {
        "meta": {"ingredients_dir": str(p.ingredients_dir), "recipes": [m.name for m in p.wanted],
                 "dataset": p.config.data.name, "model": p.config.model.name,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "command": p.command, "best_ingredient": p.names[best], "provenance": p.provenance,
                 "splits": {"heldout": int(evals[0].labels["heldout"].size), "test": int(evals[0].labels["test"].size),
                            "shifts": p.shifts}},
        "ingredients": ingredient_rows, "soups": [row.to_dict() for row in rows], **kitchen.extras,
        "methods": {m.name: m.summary for m in active},
    }
    from soupjax.devices.sharding import is_primary
    if is_primary():  # every process of a pod slice computed the same results: process 0 writes them
        paths = report.write_report(results, p.out)
        print(report.markdown_table(results), flush=True)
        print(f"report: {paths.get('markdown', p.out / 'report.md')}", flush=True)
    return results
