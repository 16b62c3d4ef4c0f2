"""Cooking: evaluate ingredients, run the recipes, save each soup and write the report.

The library behind ``python -m soupjax.soup`` (and ``soupjax.experiment``): ``cook(recipe, ...)``
does the whole job and returns the results the report is made from. The recipes are the methods of
``soupjax.methods``; each gets a ``Cooking`` (the ingredients, their evaluations, the counted held-out
evaluator, the shared init) and yields its dishes, which ``cook`` times, measures (peak host memory),
evaluates, saves and reports. Every evaluation of an
ingredient and every cooked soup is kept under ``out`` (``cache/`` and one directory per soup), so an
interrupted run resumes where it stopped.

What each soup was cooked from (the ingredients' names and a fingerprint of each one's meta.json, the
data and the recipe's options) is stored in its meta.json, and that of the whole run in the report's
``meta.provenance``. A rerun into the same ``out`` with the same ingredients and options resumes; with
others, it is refused before any work, naming what differs, unless ``overwrite`` is given: a soup or
report is never silently replaced by a different one. Every file is written under a temporary name
and renamed into place (``soupjax.io.files``).

Bad options and unusable inputs raise ``InputError`` before anything is written; ``check_options``
needs no import of JAX, so the command line refuses a bad flag at once.

With one ingredient (or one left after NaN/Inf ingredients are dropped) every recipe is that
ingredient: the uniform, greedy and pruned soups are it, the learned soup is it with weight 1 and the
ensemble is that one model. A note says so; the report is written as usual.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ml_collections import ConfigDict

from soupjax.cli.errors import InputError
from soupjax.io.files import plain

# A soup's stored options use short names; a refusal names the option as the command line spells it.
_OPTION_NAMES = {"strict": "greedy_strict", "order": "greedy_order", "passes": "pruned_passes",
                 "epochs": "learned_epochs", "lr": "learned_lr"}


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


def _what_differs(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The options that differ between what an output was made from and what is asked now.

    Fields the stored record lacks were added to soupjax since it was written: they are not compared,
    so outputs of an older soupjax resume. Ingredients are compared by name and meta fingerprint
    (``ingredient_meta``) where both have it, so a moved ingredients directory is the same one; per-recipe
    options only for the recipes both cooked.
    """
    from soupjax.config.base import differences
    stored, wanted = dict(stored), {k: v for k, v in wanted.items() if k in stored}
    out = []
    if "ingredient_meta" in wanted:
        old, new = stored.pop("ingredient_meta") or {}, wanted.pop("ingredient_meta") or {}
        stored.pop("ingredients", None), wanted.pop("ingredients", None)
        for what, names in (("ingredients no longer there", sorted(set(old) - set(new))),
                            ("new ingredients", sorted(set(new) - set(old))),
                            ("ingredients changed since (another meta.json)",
                             sorted(n for n in set(old) & set(new) if old[n] != new[n]))):
            if names:
                out.append(f"{what}: {', '.join(names)}")
    if isinstance(stored.get("options"), dict) and isinstance(wanted.get("options"), dict):
        common = set(stored["options"]) & set(wanted["options"])
        stored["options"] = {k: v for k, v in stored["options"].items() if k in common}
        wanted["options"] = {k: v for k, v in wanted["options"].items() if k in common}
    for line in differences(stored, wanted):
        key, _, rest = line.partition(":")
        *head, last = key.split(".")
        out.append(".".join([*head, _OPTION_NAMES.get(last, last)]) + f":{rest.replace(' != ', ' -> ')}")
    return out


def _refuse_different(what: str, differing: list[str]) -> None:
    shown = "; ".join(differing[:6]) + (f" (and {len(differing) - 6} more)" if len(differing) > 6 else "")
    raise InputError(f"{what} was cooked from other ingredients or options ({shown}); pass --overwrite to "
                     "replace it, or choose another --out")


@dataclasses.dataclass
class ModelEval:
    """A model's results on every split: accuracy/loss, and per-example logits for pairing/ensembles."""
    metrics: dict[str, dict[str, float]]
    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def accuracy(self, split: str) -> float:
        return self.metrics[split]["accuracy"]

    def correct(self, split: str) -> np.ndarray:
        return (self.logits[split].argmax(-1) == self.labels[split]).astype(np.int8)

    def arrays(self) -> dict[str, np.ndarray]:
        """Logits and labels as ``Kitchen.evaluate`` stores them (its ``seed_arrays``)."""
        return {f"{s}/{kind}": arrays[s] for s in self.logits
                for kind, arrays in (("logits", self.logits), ("labels", self.labels))}


class Kitchen:
    """Everything a recipe needs: the model, the data, the evaluator and a cache of evaluations."""

    def __init__(self, config: ConfigDict, out: Path, *, shifts: Sequence[str] | None, eval_batch_size: int,
                 recalibrate_batches: int = 0):
        from soupjax import data, models
        from soupjax.evaluation import evaluate
        from soupjax.devices import sharding
        from soupjax.training.train_step import apply_for_eval
        import jax
        if jax.process_count() > 1:
            # Cooking reads and writes shared files and compares accuracies computed per process;
            # it is meant for one host (which holds every device of a single TPU VM or GPU machine).
            raise RuntimeError("soupjax.soup runs on one host; start it without jax.distributed "
                               f"(this is process {jax.process_index()} of {jax.process_count()})")
        self.config = config
        self.out = out
        self.cache = out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.model = models.build_model(config)
        self.apply_fn = apply_for_eval(self.model)
        self.evaluator = evaluate.Evaluator(self.apply_fn, sharding.data_mesh())
        self.batch_size = eval_batch_size or config.eval_batch_size
        self.shifts = list(shifts) if shifts is not None else list(data.shift_splits(config.data))
        self.report_splits = ["test", *self.shifts]
        self.recalibrate_batches = recalibrate_batches
        self._data = data
        self._kept: dict[str, list] = {}
        self._kept_bytes = 0

    # Splits whose preprocessed images fit in this many bytes are kept in memory after their first
    # pass: a kitchen evaluates K ingredients and every soup on the same splits, and on a small model
    # the input pipeline would otherwise cost as much as the forward pass.
    MEMORY_FOR_SPLITS = 2 * 2**30

    def batches(self, split: str):
        """The evaluation batches of ``split`` (from memory after the first pass when they fit)."""
        if split in self._kept:
            return iter(self._kept[split])
        c = self.config.data
        size = self._data.num_examples(c, split) * c.image_size ** 2 * c.channels * 4
        if split == "train" or self._kept_bytes + size > self.MEMORY_FOR_SPLITS:
            return self._data.eval_batches(c, split, self.batch_size)
        self._kept[split] = list(self._data.eval_batches(c, split, self.batch_size))
        self._kept_bytes += size
        return iter(self._kept[split])

    def prepare(self, variables: dict[str, Any]) -> dict[str, Any]:
        """What a candidate soup goes through before it is evaluated (BatchNorm recalibration)."""
        if self.recalibrate_batches and "batch_stats" in variables:
            from soupjax.evaluation.batchnorm import recalibrate
            return recalibrate(self.model, variables, self.batches("train"), self.recalibrate_batches)
        return variables

    def heldout_accuracy(self, variables: dict[str, Any]) -> float:
        """The only accuracy greedy, pruned and learned soups may look at."""
        return self.evaluator(self.prepare(variables), self.batches("heldout")).accuracy

    def evaluate(self, name: str, variables: dict[str, Any] | None, loader: Callable[[], dict] | None = None,
                 splits: Sequence[str] | None = None, *, key: str = "", prepared: bool = False,
                 seed_arrays: Mapping[str, np.ndarray] | None = None) -> ModelEval:
        """Evaluate on held-out, test and shift splits, with the logits cached under ``name``.

        ``key`` names what is evaluated (the cache is only reused for the same key and data config);
        ``seed_arrays`` are logits already known (an ingredient's from training time); ``prepared``
        says BatchNorm recalibration was applied already.
        """
        from soupjax.config.base import fingerprint
        from soupjax.evaluation.evaluate import metrics_from_logits
        from soupjax.cli.progress import Progress
        splits = list(splits or ["heldout", *self.report_splits])
        tag = fingerprint({"key": key, "data": self._data.eval_fingerprint(self.config.data), "recalibrate": self.recalibrate_batches,
                           "batch": self.batch_size})
        path = self.cache / f"{name}-{tag}.npz"
        stored: dict[str, np.ndarray] = dict(seed_arrays or {})
        if path.exists():
            with np.load(path) as f:
                stored.update({k: f[k] for k in f.files})
        missing = [s for s in splits if f"{s}/logits" not in stored]
        if missing:
            if variables is None and loader is None:
                raise FileNotFoundError(f"{path} lacks {missing} and no model was given to evaluate")
            variables = variables if variables is not None else loader()
            variables = variables if prepared else self.prepare(variables)
            for split in missing:
                total = self._data.num_examples(self.config.data, split)
                progress = Progress(total, f"eval {name} {split}", every=15.0)
                result = self.evaluator(variables, self.batches(split), keep_logits=True,
                                        projection=self._data.logit_projection(self.config.data, split),
                                        progress=progress)
                stored[f"{split}/logits"] = result.logits
                stored[f"{split}/labels"] = result.labels
        if missing or not path.exists():
            _save_npz_atomic(path, stored)
        logits = {s: stored[f"{s}/logits"] for s in splits}
        labels = {s: stored[f"{s}/labels"] for s in splits}
        metrics = {s: metrics_from_logits(logits[s], labels[s]).metrics() for s in splits}
        return ModelEval(metrics, logits, labels)

    def evaluate_ingredient(self, ingredient) -> ModelEval:
        """An ingredient on every split; its training-time held-out/test logits are reused when they
        were computed on the same data config."""
        from soupjax.io.checkpoints import EVAL_FILE
        from soupjax.config.base import fingerprint
        seed = {}
        stored = ingredient.path / EVAL_FILE
        if stored.exists() and ingredient.meta.get("data_fingerprint") == self._data.eval_fingerprint(self.config.data):
            with np.load(stored) as f:
                seed = {k: f[k] for k in f.files}
        return self.evaluate(f"ingredient-{ingredient.name}", None, ingredient.load,
                             # The meta.json's fingerprint: an ingredient retrained in place is another model.
                             key=f"{ingredient.path}:{fingerprint(ingredient.meta)}", prepared=True,
                             seed_arrays=seed)


def _known_logits(variables: dict[str, Any], weights: Sequence[float], loaders: Sequence[Callable[[], dict]],
                  evals: Sequence[ModelEval]) -> dict[str, np.ndarray] | None:
    """The logits of a soup that is exactly one ingredient (greedy often stops at one), else None.

    Such a soup gives the same predictions as its ingredient, which was evaluated already; checking
    the weights bit for bit (one tree load) is far cheaper than evaluating every split again.
    """
    import jax
    used = [i for i, w in enumerate(weights) if w > 0]
    if len(used) != 1 or weights[used[0]] != 1.0:
        return None
    ingredient = loaders[used[0]]()
    mine, theirs = jax.tree_util.tree_flatten(variables), jax.tree_util.tree_flatten(ingredient)
    if mine[1] != theirs[1] or not all(np.array_equal(np.asarray(a), np.asarray(b))
                                       for a, b in zip(mine[0], theirs[0])):
        return None
    return evals[used[0]].arrays()


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from soupjax.io import files
    files.write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


def _row(name: str, kind: str, ev: ModelEval, kitchen: Kitchen, *, n: int, passes: int, seconds: float,
         path: str | None, weights: Sequence[float] | None) -> dict[str, Any]:
    shifts = {s: ev.accuracy(s) for s in kitchen.shifts}
    return {
        "name": name, "kind": kind, "n_ingredients": int(n), "forward_passes": int(passes),
        "heldout": ev.accuracy("heldout"),
        "test": {"accuracy": ev.accuracy("test"), "loss": ev.metrics["test"]["loss"]},
        "shifts": shifts, "shift_mean": float(np.mean(list(shifts.values()))) if shifts else None,
        "seconds": float(seconds), "path": path,
        "weights": None if weights is None else [float(w) for w in weights],
    }


def _vs_best(ev: ModelEval, best: ModelEval, shifts: Sequence[str]) -> dict[str, Any]:
    """Paired McNemar tests against the best ingredient on the test set and on all shift images."""
    from soupjax.report.stats import mcnemar

    def as_dict(r):
        return {"diff": float(r.diff), "p": float(r.p), "n": int(r.n)}

    out = {"test": as_dict(mcnemar(best.correct("test"), ev.correct("test"))), "shift": None}
    if shifts:
        a = np.concatenate([best.correct(s) for s in shifts])
        b = np.concatenate([ev.correct(s) for s in shifts])
        out["shift"] = as_dict(mcnemar(a, b))
    return out


class Cooking:
    """What a method's ``cook`` works with (``soupjax.methods``): the ingredients, their evaluations, the
    held-out evaluator (counted: the report's 'held-out evals'), the shared init, and the options.

    ``pending`` names the dishes of the current method still to cook (the others were resumed).
    """

    def __init__(self, kitchen: Kitchen, ingredients: Sequence[Any], evals: Sequence[ModelEval],
                 options: Mapping[str, Any], config: ConfigDict, key_of: Callable[[str], dict], theta0_key: str):
        self.kitchen = kitchen
        self.ingredients = list(ingredients)
        self.names = [ing.name for ing in ingredients]
        self.loaders = [ing.load for ing in ingredients]
        self.evals = list(evals)
        self.heldout = [ev.accuracy("heldout") for ev in evals]
        self.best = int(np.argmax(self.heldout))  # chosen on held-out data, never on test
        self.options = dict(options)
        self.config = config
        self.key_of = key_of
        self.theta0_key = theta0_key
        self.heldout_evals = 0
        self.pending: list[str] = []
        self._init_dir: Path | None = None

    def ranked(self) -> list[int]:
        """Ingredient indices by held-out accuracy, best first (ties: the earlier name first)."""
        return sorted(range(len(self.names)), key=lambda i: -self.heldout[i])

    def sources(self) -> list[Any]:
        """Every ingredient as a ``recipes.TensorSource`` on disk (read one tensor at a time)."""
        from soupjax.io import checkpoints
        return [checkpoints.tensor_source(ing.path) for ing in self.ingredients]

    def heldout_accuracy(self, variables: Mapping[str, Any]) -> float:
        """The held-out accuracy of a candidate: the only accuracy a method may choose by."""
        self.heldout_evals += 1
        return self.kitchen.heldout_accuracy(variables)

    def count_heldout(self, n: int) -> None:
        """Count ``n`` held-out evaluations a method made without ``heldout_accuracy``."""
        self.heldout_evals += int(n)

    def choose(self, name: str, grid: Sequence[Mapping[str, Any]], build: Callable[[Mapping[str, Any]], Any]
               ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
        """Build and score every grid point on held-out; the best one (the first of equals), its model, and
        every point's record ``{"options", "heldout"}``, with a line per point for dish ``name``. Holds the
        best candidate and one more."""
        best: tuple[float, Mapping[str, Any], Any] | None = None
        records = []
        for n, point in enumerate(grid, start=1):
            variables = build(point)
            acc = self.heldout_accuracy(variables)
            records.append({"options": dict(point), "heldout": acc})
            print(f"{name}: [{n}/{len(grid)}] {_short_options(point)}: held-out {acc:.4f}", flush=True)
            if best is None or acc > best[0]:
                best = (acc, point, variables)
            del variables
        assert best is not None, "an empty grid"  # options are checked non-empty before cooking
        return dict(best[1]), best[2], records

    def ensemble_of(self, indices: Sequence[int]) -> ModelEval:
        """The logit ensemble of the ingredients ``indices`` on every split."""
        return ensemble_of([self.evals[i] for i in indices], ["heldout", *self.kitchen.report_splits])

    def named_steps(self, progression: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return _named_steps(progression, self.names)

    # The shared init, for the methods that work on displacements from it.

    def init_problem(self) -> str | None:
        """Why the shared init θ0 the ingredients were fine-tuned from is unknown, or None once it is
        ready: rebuilt from the ingredients' config, checked against the fingerprints they recorded (of
        ``init_from``'s weights and, where recorded, of the whole start, the head init included), and kept
        under ``out/cache/init-<theta0_key>``."""
        from soupjax.io import checkpoints
        from soupjax.training import shared_init
        metas = [ing.meta for ing in self.ingredients]
        problem = shared_init.start_problem(metas)
        if problem:
            return problem
        where = self.kitchen.cache / f"init-{self.theta0_key}"
        if not checkpoints.is_ingredient(where):
            try:
                variables = shared_init.rebuild_start(self.config, metas, self.kitchen.model)
            except InputError as e:
                return str(e)
            checkpoints.save_ingredient(where, variables, {
                "name": "init", "init_fingerprint": metas[0]["init_fingerprint"],
                "start_fingerprint": metas[0].get("start_fingerprint"), "config": self.config.to_dict()})
        self._init_dir = where
        return None

    def init_source(self) -> Any:
        """The shared init as a tensor source (``init_problem`` must have said None)."""
        from soupjax.io import checkpoints
        return checkpoints.tensor_source(self._init_dir)

    def dish_source(self, name: str) -> tuple[Any, list[float]]:
        """A model by name, as a tensor source on disk: 'best_ingredient', or a soup or merge saved in
        ``out``; and its weights per ingredient."""
        from soupjax.io import checkpoints
        if name == "best_ingredient":
            return (checkpoints.tensor_source(self.ingredients[self.best].path),
                    [float(i == self.best) for i in range(len(self.names))])
        meta = checkpoints.load_meta(self.kitchen.out / name)
        return checkpoints.tensor_source(self.kitchen.out / name), list(meta["weights"])

    def evaluate_point(self, dish: str, label: str, variables: Mapping[str, Any], point: Mapping[str, Any]) -> ModelEval:
        """A point of a curve on every split (cached), counted as one held-out evaluation: only its held-out
        accuracy may choose; test and shift are for the report's curve."""
        from soupjax.config.base import fingerprint
        self.heldout_evals += 1
        return self.kitchen.evaluate(label, dict(variables), key=fingerprint({"dish": self.key_of(dish), **point}))


def _short_options(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def check_options(*, recipe: str | None = None, **options: Any) -> dict[str, Any]:
    """Every option's value (the defaults filled in), or ``InputError`` naming the first one out of its
    range as the command line spells it (``--NAME=VALUE: must be ...``), an unknown option or recipe.

    Imports nothing heavy: the command line calls it before JAX loads. ``recipe=None`` skips that check.
    """
    from soupjax import methods
    if recipe is not None:
        methods.wanted(recipe)
    return methods.resolve(options)


def cook(recipe: str, ingredients_dir: Path, out: Path, *, config: ConfigDict | None = None,
         allow_mixed_init: bool = False, shifts: Sequence[str] | None = None, data_dir: str | None = None,
         command: str = "", overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Run ``recipe`` (a name in ``soupjax.methods``, or 'all') on the ingredients in ``ingredients_dir``;
    write soups and the report to ``out``.

    ``options`` are the methods' and the shared ones (``methods.all_options()``: e.g. ``seed``,
    ``greedy_order``, ``learned_epochs``, ``ties_densities``), by the names the command line uses.
    Soups and a report already in ``out`` are reused when they were cooked from the same ingredients
    and options, refused (``InputError``) when not, unless ``overwrite``. Every check runs before the
    first write. Methods that work on displacements from the shared init need it rebuilt from the
    ingredients' config: when it cannot be, ``--recipe all`` leaves them out with a note and a single
    such method is refused with the reason. Returns the results dict that the report is made from.
    """
    from soupjax import methods
    o = check_options(recipe=recipe, **options)
    wanted = methods.wanted(recipe)
    out = Path(out)
    from soupjax.cooking import preflight
    # First, as it imports only JAX and orbax: unusable ingredients are refused before TensorFlow loads.
    ingredients = preflight.gather(ingredients_dir, allow_mixed_init=allow_mixed_init)

    from soupjax import data, report
    from soupjax.io import checkpoints
    from soupjax.config.base import fingerprint as config_fingerprint
    from soupjax.devices.memory import PeakMemory
    config = load_config(ingredients, config, data_dir)
    shift_names = _check_shifts(data, config, shifts)
    names = [ing.name for ing in ingredients]
    loaders = [ing.load for ing in ingredients]
    fingerprint = ingredients[0].meta.get("init_fingerprint")
    # Which method makes each dish, over the whole registry: WiSE-FT may start from any of them.
    method_of = {dish: m for m in methods.methods() for dish in m.dishes(o)}
    dishes = [(m, dish) for m in wanted for dish in m.dishes(o)]

    # What a soup is made from: the ingredients by name and meta.json fingerprint (a retrained
    # ingredient of the same name is another ingredient), the init, the evaluation data.
    ingredient_meta = {ing.name: config_fingerprint(ing.meta) for ing in ingredients}
    # The batch size is in too: a learned soup takes one step per held-out batch, and recalibration
    # reads that many images per batch.
    common = {"ingredients": [str(ing.path) for ing in ingredients], "ingredient_meta": ingredient_meta,
              "init": fingerprint, "data": data.eval_fingerprint(config.data), "recalibrate_bn": o["recalibrate_bn"],
              "eval_batch": o["eval_batch_size"] or config.eval_batch_size}
    theta0_key = _theta0_key(ingredients, config, data)

    def key_of(dish: str) -> dict[str, Any]:
        method = method_of[dish]
        after = {} if method.name != "wise_ft" else {"base": _wise_ft_base_key(dish, key_of, common)}
        theta0 = {"theta0": theta0_key} if method.needs_init else {}
        return plain({**common, **method.key_of(o, dish), **after, **theta0, "recipe": dish})

    _check_wise_ft_bases(o, wanted, method_of, {d for _, d in dishes}, out, key_of)
    soup_names = [d for m, d in dishes if m.saves_model]
    provenance = plain({
        "recipe": recipe, "ingredients": sorted(names), "ingredient_meta": ingredient_meta, "init": fingerprint,
        "data": data.eval_fingerprint(config.data), "model": config_fingerprint(config.model),
        "shifts": shift_names, "recalibrate_bn": o["recalibrate_bn"], "learned_mode": o["learned_mode"],
        "options": {d: {k: v for k, v in key_of(d).items() if k not in common and k != "recipe"} for d in soup_names}})
    if not overwrite:
        _refuse_changed_outputs(out, provenance, {d: key_of(d) for d in soup_names})
    check_writable(out)
    if len(ingredients) == 1:
        print(f"soupjax.soup: note: one ingredient ({names[0]}): every soup is that ingredient (uniform, greedy "
              "and pruned: itself; learned: itself with weight 1; ensemble: that one model)", flush=True)

    kitchen = Kitchen(config, out, shifts=shift_names, eval_batch_size=o["eval_batch_size"],
                      recalibrate_batches=o["recalibrate_bn"])
    print(f"soupjax.soup: {len(ingredients)} ingredients from {ingredients_dir}; model {config.model.name}, "
          f"data {config.data.name}; report splits: {', '.join(kitchen.report_splits)}", flush=True)
    # 1. Every ingredient on every split, one at a time (cached). Recalibration applies to soups only.
    evals = [kitchen.evaluate_ingredient(ing) for ing in ingredients]
    cooking = Cooking(kitchen, ingredients, evals, o, config, key_of, theta0_key)
    best = cooking.best
    rows: list[dict[str, Any]] = []
    ingredient_rows = []
    for ing, ev in zip(ingredients, evals):
        r = _row(ing.name, "individual", ev, kitchen, n=1, passes=1, seconds=0.0, path=str(ing.path), weights=None)
        ingredient_rows.append({k: r[k] for k in ("name", "path", "heldout", "test", "shifts", "shift_mean")}
                               | {"hparams": ing.meta.get("hparams", {})})
    one_hot = [1.0 if i == best else 0.0 for i in range(len(names))]
    rows.append(_row("best_ingredient", "individual", evals[best], kitchen, n=1, passes=1, seconds=0.0,
                     path=str(ingredients[best].path), weights=one_hot) | {"ingredient": names[best]})

    # 2. The shared init, when a method needs it: without it those methods cannot be cooked.
    active = list(wanted)
    if any(m.needs_init for m in wanted):
        problem = cooking.init_problem()
        if problem:
            needing = [m.name for m in wanted if m.needs_init]
            if recipe != "all":
                raise InputError(f"--recipe={recipe} works on the displacements from the shared init, which is "
                                 f"unknown: {problem}")
            print(f"soupjax.soup: note: {', '.join(needing)} left out: they work on the displacements from the "
                  f"shared init, which is unknown: {problem}", flush=True)
            active = [m for m in wanted if not m.needs_init]

    soup_evals: dict[str, ModelEval] = {}
    extras: dict[str, dict[str, Any]] = {"progressions": {}, "learned_history": {}, "grids": {}, "wise_ft": {}}

    def collect(name: str, meta: Mapping[str, Any], grid: Any) -> None:
        for field, into in (("progression", "progressions"), ("history", "learned_history"), ("curve", "wise_ft")):
            if meta.get(field):
                extras[into][name] = meta[field]
        if grid:
            extras["grids"][name] = grid

    def cost(row: dict[str, Any], method: Any, heldout_evals: int | None, peak_mb: float | None,
             chosen: Any) -> dict[str, Any]:
        # None: a dish cooked by a soupjax that did not count (resumed): unknown, not zero.
        return row | {"kind": method.kind, "method": method.name,
                      "heldout_evals": None if heldout_evals is None else int(heldout_evals),
                      "peak_memory_mb": None if peak_mb is None else round(float(peak_mb), 1), "chosen": chosen}

    def finish(method: Any, dish: Any, seconds: float, heldout_evals: int, peak_mb: float | None) -> None:
        """Evaluate a dish, save it (a model) as an ingredient-format checkpoint, add its report row."""
        name, weights = dish.name, [float(w) for w in dish.weights]
        n_used = dish.n_used if dish.n_used is not None else sum(w != 0 for w in weights)
        path = None
        if dish.variables is not None:
            variables = kitchen.prepare(dish.variables)
            # A dish chosen from evaluated points (WiSE-FT's line) brings its evaluation: not run again.
            known = dish.evaluation.arrays() if dish.evaluation is not None else \
                _known_logits(variables, weights, loaders, evals)
            ev = kitchen.evaluate(f"soup-{name}", variables, key=config_fingerprint(key_of(name)), prepared=True,
                                  seed_arrays=known)
            meta = {"name": name, "recipe": name, "method": method.name, "kind": method.kind,
                    "config": config.to_dict(), "init_fingerprint": fingerprint,
                    "data_fingerprint": data.eval_fingerprint(config.data), "options": key_of(name),
                    "ingredients": names, "used": [n for n, w in zip(names, weights) if w != 0], "weights": weights,
                    "metrics": ev.metrics, "seconds": seconds, "recalibrated_bn_batches": o["recalibrate_bn"],
                    "heldout_evals": heldout_evals, "peak_memory_mb": peak_mb, "chosen": dish.chosen,
                    "grid": dish.grid, "forward_passes": dish.forward_passes, "n_used": n_used, **dish.meta}
            path = out / name
            checkpoints.save_ingredient(path, variables, plain(meta))
        else:
            ev = dish.evaluation
        soup_evals[name] = ev
        collect(name, dish.meta, dish.grid)
        rows.append(cost(_row(name, method.kind, ev, kitchen, n=n_used, passes=dish.forward_passes, seconds=seconds,
                              path=None if path is None else str(path), weights=weights),
                         method, heldout_evals, peak_mb, dish.chosen))

    def already(method: Any, name: str) -> bool:
        """A dish cooked earlier from the same ingredients, data and options is reused (resume)."""
        soup_dir = out / name
        if not method.saves_model or not checkpoints.is_ingredient(soup_dir):
            return False
        meta = checkpoints.load_meta(soup_dir)
        differing = _what_differs(meta.get("options") or {}, key_of(name))
        if differing:  # refused before any work unless overwrite was asked for
            print(f"{name}: the soup in {soup_dir} was cooked from other ingredients or options "
                  f"({'; '.join(differing[:3])}); cooking it again (overwrite)", flush=True)
            return False
        ev = kitchen.evaluate(f"soup-{name}", None, lambda: checkpoints.load_variables(soup_dir),
                              key=config_fingerprint(key_of(name)), prepared=True)
        soup_evals[name] = ev
        collect(name, meta, meta.get("grid"))
        n_used = meta.get("n_used", len(meta["used"]))
        rows.append(cost(_row(name, method.kind, ev, kitchen, n=n_used, passes=meta.get("forward_passes", 1),
                              seconds=meta["seconds"], path=str(soup_dir), weights=meta["weights"]),
                         method, meta.get("heldout_evals"), meta.get("peak_memory_mb"), meta.get("chosen")))
        print(f"{name}: cooked earlier, reused ({soup_dir})", flush=True)
        return True

    # 3. Every method, in the registry's order; each dish timed, its held-out evaluations counted and
    # its peak memory measured while it is cooked.
    for method in active:
        cooking.pending = [d for d in method.dishes(o) if not already(method, d)]
        if not cooking.pending:
            continue
        dishes_of = None
        while True:
            before, started = cooking.heldout_evals, time.time()
            with PeakMemory() as peak:
                # A method may return a list (all its work done in the call) or yield dish by dish:
                # either way the work is inside the window that times and measures the dish.
                dishes_of = dishes_of or iter(method.cook(cooking))
                dish = next(dishes_of, None)
            if dish is None:
                break
            finish(method, dish, time.time() - started, cooking.heldout_evals - before, peak.mebibytes)

    for row in rows:
        row["vs_best"] = (None if row["name"] == "best_ingredient"
                          else _vs_best(soup_evals[row["name"]], evals[best], kitchen.shifts))

    results = {
        "meta": {"ingredients_dir": str(ingredients_dir), "recipes": [m.name for m in wanted], "dataset": config.data.name,
                 "model": config.model.name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "command": command, "best_ingredient": names[best], "provenance": provenance,
                 "splits": {"heldout": int(evals[0].labels["heldout"].size), "test": int(evals[0].labels["test"].size),
                            "shifts": kitchen.shifts}},
        "ingredients": ingredient_rows, "soups": rows, **extras,
        "methods": {m.name: m.summary for m in active},
    }
    paths = report.write_report(results, out)
    print(report.markdown_table(results), flush=True)
    print(f"report: {paths.get('markdown', out / 'report.md')}", flush=True)
    return results


def _check_wise_ft_bases(options: Mapping[str, Any], wanted: Sequence[Any], method_of: Mapping[str, Any],
                         cooked_now: set[str], out: Path, key_of: Callable[[str], dict]) -> None:
    """``InputError`` for a ``--wise_ft_of`` name that is no model, one that will not be there to start
    from, or one in ``out`` cooked from other ingredients or options than those given now (WiSE-FT's
    result is keyed by its base's options, so the base must be what they describe)."""
    if not any(m.name == "wise_ft" for m in wanted):
        return
    from soupjax.io import checkpoints
    from soupjax.methods import wise_ft
    if not wise_ft.bases(options):
        raise InputError(f"--wise_ft_of={options['wise_ft_of']!r}: name at least one model (best_ingredient or a soup)")
    for base in wise_ft.bases(options):
        if base == "best_ingredient":
            continue
        method = method_of.get(base)
        if method is None or not method.saves_model or method.name == "wise_ft":
            models = [d for d, m in method_of.items() if m.saves_model and m.name != "wise_ft"]
            raise InputError(f"--wise_ft_of={options['wise_ft_of']!r}: {base!r} is not a model soupjax cooks with "
                             f"these options; choose from best_ingredient, {', '.join(models)}")
        if base in cooked_now:
            continue
        if not checkpoints.is_ingredient(out / base):
            raise InputError(f"--wise_ft_of: the {base} soup is not in {out}: cook it first (--recipe "
                             f"{method.name}) or use --recipe all")
        differing = _what_differs(checkpoints.load_meta(out / base).get("options") or {}, key_of(base))
        if differing:
            raise InputError(f"--wise_ft_of: the {base} soup in {out} was cooked from other ingredients or options "
                             f"({'; '.join(differing[:4])}); cook it again first (--recipe {method.name} --overwrite) "
                             "or give the options it was cooked with")


def _theta0_key(ingredients: Sequence[Any], config: ConfigDict, data: Any) -> str:
    """What names θ0: the fingerprint of the whole start where the ingredients recorded it; for older
    ingredients, their init's fingerprint and what the head init is rebuilt from (config, data, probe)."""
    from soupjax.config.base import fingerprint
    start = ingredients[0].meta.get("start_fingerprint")
    if start:
        return str(start)
    head = fingerprint({"head_init": config.head_init, "probe": config.linear_probe,
                        "data": data.eval_fingerprint(config.data), "batch": config.eval_batch_size})
    return f"{ingredients[0].meta.get('init_fingerprint')}-{head}"


def _wise_ft_base_key(dish: str, key_of: Callable[[str], dict], common: Mapping[str, Any]) -> Any:
    """What a WiSE-FT dish's base is: its recipe and options (what it shares with every dish, the
    ingredients and data, is in the WiSE-FT dish's own key already)."""
    base = dish.removeprefix("wise_ft_")
    if base == "best_ingredient":
        return base
    return {k: v for k, v in key_of(base).items() if k not in common}


def _check_shifts(data: Any, config: ConfigDict, shifts: Sequence[str] | None) -> list[str]:
    """The shift splits to report (``shifts``, or the data set's); ``InputError`` for an unknown name."""
    if shifts is None:
        return list(data.shift_splits(config.data))
    for split in shifts:
        try:
            data.logit_projection(config.data, split)  # validates the name, reads nothing
        except ValueError as e:
            raise InputError(f"--shifts: {e}") from e
    return list(shifts)


# What a report in ``out`` and a new run into it must share: what every soup is cooked from and evaluated
# on. The recipe and its options are left out: cooking another recipe into the same ``out`` (uniform,
# then greedy) writes a report of that recipe, and each soup's own options are compared per soup.
REPORT_PROVENANCE = ("ingredients", "ingredient_meta", "init", "data", "model", "shifts", "recalibrate_bn")


def _refuse_changed_outputs(out: Path, provenance: Mapping[str, Any], soup_keys: Mapping[str, Any]) -> None:
    """``InputError`` when ``out`` holds a report made from other ingredients or data
    (``REPORT_PROVENANCE``), or a soup made from other ingredients or options.

    A report or soup written by a soupjax that did not record its provenance is not compared.
    """
    from soupjax.io import checkpoints
    report_file = out / "report.json"
    if report_file.is_file():
        try:
            stored = json.loads(report_file.read_text()).get("meta", {}).get("provenance")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise InputError(f"{report_file} is not a soupjax report ({e}); pass --overwrite to replace it, "
                             "or choose another --out") from e
        if isinstance(stored, dict):
            differing = _what_differs({k: v for k, v in stored.items() if k in REPORT_PROVENANCE},
                                      {k: v for k, v in provenance.items() if k in REPORT_PROVENANCE})
            if differing:
                _refuse_different(f"the report in {out}", differing)
    for name, key in soup_keys.items():
        if checkpoints.is_ingredient(out / name):
            stored = checkpoints.load_meta(out / name).get("options") or {}
            differing = _what_differs(stored, key)
            if differing:
                _refuse_different(f"the {name} soup in {out / name}", differing)


def load_config(ingredients, config: ConfigDict | None, data_dir: str | None) -> ConfigDict:
    """The ingredients' own config (or ``config``), with ``data_dir`` replaced when given."""
    config = copy.deepcopy(config) if config is not None else ConfigDict(ingredients[0].meta["config"])
    if data_dir:
        config.data.data_dir = data_dir
    return config


def ensemble_of(evals: Sequence[ModelEval], splits: Sequence[str]) -> ModelEval:
    """The logit ensemble: the mean of the K models' logits (as the official code does)."""
    from soupjax.evaluation.evaluate import metrics_from_logits
    logits = {s: np.mean([ev.logits[s] for ev in evals], axis=0) for s in splits}
    labels = {s: evals[0].labels[s] for s in splits}
    return ModelEval({s: metrics_from_logits(logits[s], labels[s]).metrics() for s in splits}, logits, labels)


def _named_steps(progression: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for step in progression:
        step = dict(step)
        if isinstance(step.get("ingredient"), (int, np.integer)):
            step["ingredient"] = names[int(step["ingredient"])]
        out.append(plain(step))
    return out
