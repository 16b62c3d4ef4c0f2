"""Cooking: evaluate ingredients, run the recipes, save each soup and write the report.

The library behind ``python -m soupjax.soup`` (and ``soupjax.experiment``): ``cook(recipe, ...)``
does the whole job and returns the results the report is made from. Every evaluation of an
ingredient and every cooked soup is kept under ``out`` (``cache/`` and one directory per soup), so an
interrupted run resumes where it stopped.

What each soup was cooked from (the ingredients' names and a fingerprint of each one's meta.json, the
data and the recipe's options) is stored in its meta.json, and that of the whole run in the report's
``meta.provenance``. A rerun into the same ``out`` with the same ingredients and options resumes; with
others, it is refused before any work, naming what differs, unless ``overwrite`` is given: a soup or
report is never silently replaced by a different one. Every file is written under a temporary name
and renamed into place (``soupjax.files``).

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

from soupjax.cli_errors import InputError

RECIPES = ("uniform", "greedy", "pruned", "learned", "ensemble", "all")
GREEDY_ORDERS = ("sorted", "random")
LEARNED_MODES = ("global", "layer", "both")
# A soup's stored options use short names; a refusal names the option as the command line spells it.
_OPTION_NAMES = {"strict": "greedy_strict", "order": "greedy_order", "passes": "pruned_passes",
                 "epochs": "learned_epochs", "lr": "learned_lr"}


def check_options(*, recipe: str | None = None, greedy_order: str = "sorted", pruned_passes: int = 1,
                  learned_mode: str = "both", learned_epochs: int = 5, learned_lr: float = 0.05,
                  memory_budget_mb: float = 0, recalibrate_bn: int = 0, eval_batch_size: int = 0) -> None:
    """``InputError`` naming the first option out of its range (the names are ``cook``'s and the flags').

    Imports nothing heavy: the command line calls it before JAX loads. ``recipe=None`` skips that check.
    """
    def bad(name: str, value: Any, want: str) -> InputError:
        return InputError(f"--{name}={value!r}: must be {want}")

    if recipe is not None and recipe not in RECIPES:
        raise bad("recipe", recipe, "one of " + ", ".join(RECIPES))
    if greedy_order not in GREEDY_ORDERS:
        raise bad("greedy_order", greedy_order, "one of " + ", ".join(GREEDY_ORDERS))
    if learned_mode not in LEARNED_MODES:
        raise bad("learned_mode", learned_mode, "one of " + ", ".join(LEARNED_MODES))
    # Pruning makes at least one pass: zero passes would be the uniform soup under another name.
    for name, value, low, note in (("pruned_passes", pruned_passes, 1, ""),
                                   ("learned_epochs", learned_epochs, 1, ""),
                                   ("recalibrate_bn", recalibrate_bn, 0, " (0: no recalibration)"),
                                   ("eval_batch_size", eval_batch_size, 0, " (0: the config's)")):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise bad(name, value, f"an integer >= {low}{note}")
    if not (np.isfinite(learned_lr) and learned_lr > 0):
        raise bad("learned_lr", learned_lr, "a positive number")
    if not (np.isfinite(memory_budget_mb) and memory_budget_mb >= 0):
        raise bad("memory_budget_mb", memory_budget_mb, "a number of MiB >= 0 (0: keep every ingredient in memory)")


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be made in it (``files.writable_problem``), or ``InputError``
    saying why not.

    Checked before any work: hours of cooking must not end at the first write.
    """
    from soupjax import files
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
    from soupjax.config_base import differences
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


class Kitchen:
    """Everything a recipe needs: the model, the data, the evaluator and a cache of evaluations."""

    def __init__(self, config: ConfigDict, out: Path, *, shifts: Sequence[str] | None, eval_batch_size: int,
                 recalibrate_batches: int = 0):
        from soupjax import data, evaluate, sharding, train
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
        self.model = train.build_model(config)
        self.apply_fn = train.apply_for_eval(self.model)
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
            from soupjax.batchnorm import recalibrate
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
        from soupjax.config_base import fingerprint
        from soupjax.evaluate import metrics_from_logits
        from soupjax.progress import Progress
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
        from soupjax.checkpoints import EVAL_FILE
        seed = {}
        stored = ingredient.path / EVAL_FILE
        if stored.exists() and ingredient.meta.get("data_fingerprint") == self._data.eval_fingerprint(self.config.data):
            with np.load(stored) as f:
                seed = {k: f[k] for k in f.files}
        return self.evaluate(f"ingredient-{ingredient.name}", None, ingredient.load,
                             key=f"{ingredient.path}:{ingredient.meta.get('init_fingerprint')}", prepared=True,
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
    ev = evals[used[0]]
    return {f"{s}/{kind}": arrays[s] for s in ev.logits for kind, arrays in (("logits", ev.logits), ("labels", ev.labels))}


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from soupjax import files
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
    from soupjax.stats import mcnemar

    def as_dict(r):
        return {"diff": float(r.diff), "p": float(r.p), "n": int(r.n)}

    out = {"test": as_dict(mcnemar(best.correct("test"), ev.correct("test"))), "shift": None}
    if shifts:
        a = np.concatenate([best.correct(s) for s in shifts])
        b = np.concatenate([ev.correct(s) for s in shifts])
        out["shift"] = as_dict(mcnemar(a, b))
    return out


def cook(recipe: str, ingredients_dir: Path, out: Path, *, config: ConfigDict | None = None,
         allow_mixed_init: bool = False, greedy_strict: bool = False, greedy_order: str = "sorted",
         seed: int = 0, pruned_passes: int = 1, learned_mode: str = "both", learned_epochs: int = 5,
         learned_lr: float = 0.05, memory_budget_mb: float = 0, recalibrate_bn: int = 0,
         shifts: Sequence[str] | None = None, eval_batch_size: int = 0, data_dir: str | None = None,
         command: str = "", overwrite: bool = False) -> dict[str, Any]:
    """Run ``recipe`` on the ingredients in ``ingredients_dir``; write soups and the report to ``out``.

    Soups and a report already in ``out`` are reused when they were cooked from the same ingredients
    and options, refused (``InputError``) when not, unless ``overwrite``. Every check runs before the
    first write. Returns the results dict that the report is made from.
    """
    check_options(recipe=recipe, greedy_order=greedy_order, pruned_passes=pruned_passes,
                  learned_mode=learned_mode, learned_epochs=learned_epochs, learned_lr=learned_lr,
                  memory_budget_mb=memory_budget_mb, recalibrate_bn=recalibrate_bn, eval_batch_size=eval_batch_size)
    out = Path(out)
    from soupjax import preflight
    # First, as it imports only JAX and orbax: unusable ingredients are refused before TensorFlow loads.
    ingredients = preflight.gather(ingredients_dir, allow_mixed_init=allow_mixed_init)

    from soupjax import checkpoints, config_base, data, learned, recipes, report
    from soupjax.config_base import fingerprint as config_fingerprint
    config = load_config(ingredients, config, data_dir)
    shift_names = _check_shifts(data, config, shifts)
    names = [ing.name for ing in ingredients]
    loaders = [ing.load for ing in ingredients]

    progressions: dict[str, list] = {}
    histories: dict[str, list] = {}
    fingerprint = ingredients[0].meta.get("init_fingerprint")

    # What a soup is made from: the ingredients by name and meta.json fingerprint (a retrained
    # ingredient of the same name is another ingredient), the init, the evaluation data.
    ingredient_meta = {ing.name: config_fingerprint(ing.meta) for ing in ingredients}
    common = {"ingredients": [str(ing.path) for ing in ingredients], "ingredient_meta": ingredient_meta,
              "init": fingerprint, "data": data.eval_fingerprint(config.data), "recalibrate_bn": recalibrate_bn}
    # With recalibration, greedy scores its first ingredient recalibrated and learned soups train with
    # recalibrated statistics; soups cooked before that (same options otherwise) are cooked again.
    recalibrated = {"recalibrated": "first_and_candidates"} if recalibrate_bn else {}
    learned_stats = {"train_statistics": "recalibrated_each_epoch"} if recalibrate_bn else {}
    options = {
        "uniform": {},
        "greedy": {"strict": greedy_strict, "order": greedy_order, "seed": seed, **recalibrated},
        "pruned": {"strict": greedy_strict, "passes": pruned_passes},
        "learned_global": {"epochs": learned_epochs, "lr": learned_lr, "seed": seed, **learned_stats},
        "learned_layer": {"epochs": learned_epochs, "lr": learned_lr, "seed": seed, **learned_stats},
    }
    soup_evals: dict[str, ModelEval] = {}

    def key_of(name: str) -> dict[str, Any]:
        return config_base.as_plain({**common, **options[name], "recipe": name})

    wanted = {"uniform", "greedy", "pruned", "learned", "ensemble"} if recipe == "all" else {recipe}
    learned_modes = ["global", "layer"] if learned_mode == "both" else [learned_mode]
    soup_names = [n for n in ("uniform", "greedy", "pruned") if n in wanted]
    soup_names += [f"learned_{m}" for m in learned_modes] if "learned" in wanted else []
    provenance = config_base.as_plain({
        "recipe": recipe, "ingredients": sorted(names), "ingredient_meta": ingredient_meta, "init": fingerprint,
        "data": data.eval_fingerprint(config.data), "model": config_fingerprint(config.model),
        "shifts": shift_names, "recalibrate_bn": recalibrate_bn, "learned_mode": learned_mode,
        "options": {name: options[name] for name in soup_names}})
    if not overwrite:
        _refuse_changed_outputs(out, provenance, {name: key_of(name) for name in soup_names})
    check_writable(out)
    if len(ingredients) == 1:
        print(f"soupjax.soup: note: one ingredient ({names[0]}): every soup is that ingredient (uniform, greedy "
              "and pruned: itself; learned: itself with weight 1; ensemble: that one model)", flush=True)

    kitchen = Kitchen(config, out, shifts=shift_names, eval_batch_size=eval_batch_size,
                      recalibrate_batches=recalibrate_bn)
    print(f"soupjax.soup: {len(ingredients)} ingredients from {ingredients_dir}; model {config.model.name}, "
          f"data {config.data.name}; report splits: {', '.join(kitchen.report_splits)}", flush=True)
    # 1. Every ingredient on every split, one at a time (cached). Recalibration applies to soups only.
    evals = [kitchen.evaluate_ingredient(ing) for ing in ingredients]
    heldout = [ev.accuracy("heldout") for ev in evals]
    best = int(np.argmax(heldout))  # chosen on held-out data, never on test
    rows: list[dict[str, Any]] = []
    ingredient_rows = []
    for ing, ev in zip(ingredients, evals):
        r = _row(ing.name, "individual", ev, kitchen, n=1, passes=1, seconds=0.0, path=str(ing.path), weights=None)
        ingredient_rows.append({k: r[k] for k in ("name", "path", "heldout", "test", "shifts", "shift_mean")}
                               | {"hparams": ing.meta.get("hparams", {})})
    one_hot = [1.0 if i == best else 0.0 for i in range(len(names))]
    rows.append(_row("best_ingredient", "individual", evals[best], kitchen, n=1, passes=1, seconds=0.0,
                     path=str(ingredients[best].path), weights=one_hot) | {"ingredient": names[best]})

    def finish(name: str, variables: dict[str, Any], weights: Sequence[float], seconds: float, extra: dict):
        """Evaluate a cooked soup, save it as an ingredient-format checkpoint, add its report row."""
        variables = kitchen.prepare(variables)
        soup_dir = out / name
        key = key_of(name)
        ev = kitchen.evaluate(f"soup-{name}", variables, key=config_fingerprint(key), prepared=True,
                              seed_arrays=_known_logits(variables, weights, loaders, evals))
        used = [n for n, w in zip(names, weights) if w > 0]
        meta = {"name": name, "recipe": name, "config": config.to_dict(), "init_fingerprint": fingerprint,
                "data_fingerprint": data.eval_fingerprint(config.data), "options": key,
                "ingredients": names, "used": used, "weights": [float(w) for w in weights],
                "metrics": ev.metrics, "seconds": seconds, "recalibrated_bn_batches": recalibrate_bn, **extra}
        checkpoints.save_ingredient(soup_dir, variables, meta)
        soup_evals[name] = ev
        rows.append(_row(name, "soup", ev, kitchen, n=len(used), passes=1, seconds=seconds, path=str(soup_dir),
                         weights=weights))

    def already(name: str) -> bool:
        """A soup cooked earlier from the same ingredients, data and options is reused (resume)."""
        soup_dir = out / name
        if not checkpoints.is_ingredient(soup_dir):
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
        rows.append(_row(name, "soup", ev, kitchen, n=len(meta["used"]), passes=1, seconds=meta["seconds"],
                         path=str(soup_dir), weights=meta["weights"]))
        if meta.get("progression"):
            progressions[name] = meta["progression"]
        if meta.get("history"):
            histories[name] = meta["history"]
        print(f"{name}: cooked earlier, reused ({soup_dir})", flush=True)
        return True

    if "uniform" in wanted and not already("uniform"):
        t = time.time()
        # Per tensor from disk: memory for the soup and a few tensors, never a second whole model.
        soup = recipes.uniform_by_tensor([checkpoints.tensor_source(ing.path) for ing in ingredients])
        finish("uniform", soup, [1.0 / len(names)] * len(names), time.time() - t, {})
    if "greedy" in wanted and not already("greedy"):
        t = time.time()
        # The ingredients' own scores (their trained statistics) set the order; with recalibration the
        # first ingredient is scored recalibrated too, as every candidate is: like against like.
        res = recipes.greedy(loaders, heldout, kitchen.heldout_accuracy, strict=greedy_strict,
                             order=greedy_order, seed=seed, evaluate_first=bool(recalibrate_bn))
        steps = _named_steps(res.progression, names)
        progressions["greedy"] = steps
        finish("greedy", res.variables, res.weights, time.time() - t, {"progression": steps, "order": greedy_order})
    if "pruned" in wanted and not already("pruned"):
        t = time.time()
        res = recipes.pruned(loaders, kitchen.heldout_accuracy, passes=pruned_passes, heldout_scores=heldout,
                             strict=greedy_strict)
        steps = _named_steps(res.progression, names)
        progressions["pruned"] = steps
        finish("pruned", res.variables, res.weights, time.time() - t, {"progression": steps, "passes": pruned_passes})
    if "learned" in wanted:
        modes = ["global", "layer"] if learned_mode == "both" else [learned_mode]
        budget = int(memory_budget_mb * 2**20) if memory_budget_mb > 0 else None
        for mode in modes:
            name = f"learned_{mode}"
            if already(name):
                continue
            t = time.time()
            # With recalibration the mixing weights are learned with the soup's own statistics (as it
            # is evaluated), not with the mixed ones that do not describe the mixed weights.
            res = learned.learned(loaders, kitchen.apply_fn, lambda: kitchen.batches("heldout"), mode=mode,
                                  epochs=learned_epochs, learning_rate=learned_lr, memory_budget_bytes=budget,
                                  seed=seed, on_epoch=_print_epoch(name),
                                  recalibrate=kitchen.prepare if recalibrate_bn else None)
            histories[name] = res.history
            weights = _global_weights(res.weights)
            finish(name, res.variables, weights, time.time() - t,
                   {"history": res.history, "temperature": float(res.temperature),
                    "layer_weights": _jsonable(res.weights) if mode == "layer" else None})
    if "ensemble" in wanted:
        t = time.time()
        soup_evals["ensemble"] = ensemble_of(evals, ["heldout", *kitchen.report_splits])
        rows.append(_row("ensemble", "ensemble", soup_evals["ensemble"], kitchen, n=len(names), passes=len(names),
                         seconds=time.time() - t, path=None, weights=[1.0 / len(names)] * len(names)))

    for row in rows:
        row["vs_best"] = (None if row["name"] == "best_ingredient"
                          else _vs_best(soup_evals[row["name"]], evals[best], kitchen.shifts))

    results = {
        "meta": {"ingredients_dir": str(ingredients_dir), "recipes": sorted(wanted), "dataset": config.data.name,
                 "model": config.model.name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "command": command, "best_ingredient": names[best], "provenance": provenance,
                 "splits": {"heldout": int(evals[0].labels["heldout"].size), "test": int(evals[0].labels["test"].size),
                            "shifts": kitchen.shifts}},
        "ingredients": ingredient_rows, "soups": rows, "progressions": progressions, "learned_history": histories,
    }
    paths = report.write_report(results, out)
    print(report.markdown_table(results), flush=True)
    print(f"report: {paths.get('markdown', out / 'report.md')}", flush=True)
    return results


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
    from soupjax import checkpoints
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
    from soupjax.evaluate import metrics_from_logits
    logits = {s: np.mean([ev.logits[s] for ev in evals], axis=0) for s in splits}
    labels = {s: evals[0].labels[s] for s in splits}
    return ModelEval({s: metrics_from_logits(logits[s], labels[s]).metrics() for s in splits}, logits, labels)


def _named_steps(progression: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for step in progression:
        step = dict(step)
        if isinstance(step.get("ingredient"), (int, np.integer)):
            step["ingredient"] = names[int(step["ingredient"])]
        out.append(_jsonable(step))
    return out


def _global_weights(weights: Any) -> list[float]:
    """Per-ingredient weights; for a per-layer soup, each ingredient's mean weight over layers."""
    if isinstance(weights, dict):
        return [float(w) for w in np.mean(np.stack([np.asarray(v) for v in weights.values()]), axis=0)]
    return [float(w) for w in np.asarray(weights)]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _print_epoch(name: str):
    def show(record: dict[str, Any]) -> None:
        print(f"{name}: epoch {record['epoch']} loss {record['loss']:.4f} held-out {record['heldout_accuracy']:.4f}",
              flush=True)
    return show
