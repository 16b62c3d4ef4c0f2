"""Evaluations while cooking: every ingredient, candidate and soup on the held-out, test and shift
splits, with the logits cached under ``out/cache`` (keyed by what was evaluated and on which data), so
an interrupted run resumes without evaluating again.

``Evaluations`` holds the model, the evaluator and the batches (kept in memory when they fit);
``ModelEval`` is one model's results; ``ensemble_of`` averages logits; ``known_logits`` recognises a
soup that is exactly one ingredient, whose evaluation exists already.

On several processes (a pod slice, ``jax.distributed``) each evaluates its shard of every split and
every process ends with the whole split's logits and labels, in the split's order
(``sharding.gather_rows``), so that every recipe, the ensembles and the report's paired tests compute
the same on each; process 0 alone writes the cache. What needs whole batches rather than per-example
results (a learned soup's steps, BatchNorm recalibration) reads ``global_batches``: the batches one
process would read, on every process. With one process nothing is gathered.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ml_collections import ConfigDict


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
        """Logits and labels as ``Evaluations.evaluate`` stores them (its ``seed_arrays``)."""
        return {f"{s}/{kind}": arrays[s] for s in self.logits
                for kind, arrays in (("logits", self.logits), ("labels", self.labels))}


class Evaluations:
    """The model, the evaluation data and evaluator, and a cache of every evaluation under ``out/cache``."""

    def __init__(self, config: ConfigDict, out: Path, *, shifts: Sequence[str] | None, eval_batch_size: int,
                 recalibrate_batches: int = 0, activation: str | None = None):
        from soupjax import data, models
        from soupjax.evaluation import evaluate
        from soupjax.devices import sharding
        self.config = config
        self.out = out
        self.cache = out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.model = models.build_model_from_run_config(config, activation)  # the activation meta.json records
        self.evaluator = evaluate.for_model(self.model, sharding.data_mesh())
        self.apply_fn = self.evaluator.apply_fn
        self.batch_size = eval_batch_size or config.eval_batch_size
        self.shifts = list(shifts) if shifts is not None else list(data.shift_splits(config.data))
        self.report_splits = ["test", *self.shifts]
        self.recalibrate_batches = recalibrate_batches
        self._data = data
        self._sharding = sharding
        self._kept: dict[str, list] = {}
        self._kept_global: dict[str, list] = {}
        self._kept_bytes = 0
        self._counts: dict[str, int] = {}

    # Splits whose preprocessed images fit in this many bytes are kept in memory after their first
    # pass: cooking evaluates K ingredients and every soup on the same splits, and on a small model
    # the input pipeline would otherwise cost as much as the forward pass.
    MEMORY_FOR_SPLITS = 2 * 2**30

    def num_examples(self, split: str) -> int:
        """The examples of ``split`` over all processes (asked of the data once per split: TFDS builds a
        dataset to count them, and every evaluation's progress line wants the number)."""
        if split not in self._counts:
            self._counts[split] = self._data.num_examples(self.config.data, split)
        return self._counts[split]

    def batches(self, split: str):
        """The evaluation batches of ``split`` (from memory after the first pass when they fit)."""
        if split in self._kept:
            return iter(self._kept[split])
        c = self.config.data
        size = self.num_examples(split) * c.image_size ** 2 * c.channels * 4
        if split == "train" or self._kept_bytes + size > self.MEMORY_FOR_SPLITS:
            return self._data.eval_batches(c, split, self.batch_size)
        self._kept[split] = list(self._data.eval_batches(c, split, self.batch_size))
        self._kept_bytes += size
        return iter(self._kept[split])

    def global_batches(self, split: str):
        """The batches of ``split`` one process reading all of it would see, the same on every process
        (``sharding.global_batches``; kept in memory when the split's own batches are and the whole
        split fits what is left of ``MEMORY_FOR_SPLITS``: the same choice on every process); with one
        process, ``batches(split)``."""
        import jax
        if jax.process_count() == 1:
            return self.batches(split)
        if split in self._kept_global:
            return iter(self._kept_global[split])
        batches = self._sharding.global_batches(self.batches(split), self.batch_size)
        c = self.config.data
        size = self.num_examples(split) * c.image_size ** 2 * c.channels * 4
        if split not in self._kept or self._kept_bytes + size > self.MEMORY_FOR_SPLITS:
            return batches
        self._kept_global[split] = list(batches)
        self._kept_bytes += size
        return iter(self._kept_global[split])

    def prepare(self, variables: dict[str, Any]) -> dict[str, Any]:
        """What a candidate soup goes through before it is evaluated (BatchNorm recalibration, on the
        training batches one process would read, so that every process gets the same statistics)."""
        if self.recalibrate_batches and "batch_stats" in variables:
            from soupjax.evaluation.batchnorm import recalibrate
            return recalibrate(self.model, variables, self.global_batches("train"), self.recalibrate_batches)
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
        import jax
        splits = list(splits or ["heldout", *self.report_splits])
        tag = fingerprint({"key": key, "data": self._data.eval_fingerprint(self.config.data), "recalibrate": self.recalibrate_batches,
                           "batch": self.batch_size})
        path = self.cache / f"{name}-{tag}.npz"
        stored: dict[str, np.ndarray] = dict(seed_arrays or {})
        if path.exists():
            with np.load(path) as f:
                stored.update({k: f[k] for k in f.files})
        # Every process evaluates what any of them lacks (the evaluation is collective): a cache one
        # process sees and another does not (not yet written, or not shared) must not split them.
        wanted = self._sharding.any_process([f"{s}/logits" not in stored for s in splits])
        missing = [s for s, want in zip(splits, wanted) if want]
        if missing:
            if variables is None and loader is None:
                raise FileNotFoundError(f"{path} lacks {missing} and no model was given to evaluate")
            variables = variables if variables is not None else loader()
            variables = variables if prepared else self.prepare(variables)
            for split in missing:
                total = self.num_examples(split)
                # On several processes, process 0 tells of its share (about 1/count of the split).
                progress = Progress(-(-total // jax.process_count()), f"eval {name} {split}", every=15.0) \
                    if self._sharding.is_primary() else None
                result = self.evaluator(variables, self.batches(split), keep_logits=True, all_rows=True,
                                        projection=self._data.logit_projection(self.config.data, split),
                                        progress=progress)
                stored[f"{split}/logits"] = result.logits
                stored[f"{split}/labels"] = result.labels
        if (missing or not path.exists()) and self._sharding.is_primary():
            save_npz_atomic(path, stored)
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
            with stored.open("rb") as file, np.load(file) as f:  # stored may be a gs:// epath.Path
                seed = {k: f[k] for k in f.files}
        return self.evaluate(f"ingredient-{ingredient.name}", None, ingredient.load,
                             # The meta.json's fingerprint: an ingredient retrained in place is another model.
                             key=f"{ingredient.path}:{fingerprint(ingredient.meta)}", prepared=True,
                             seed_arrays=seed)


def known_logits(variables: dict[str, Any], weights: Sequence[float], loaders: Sequence[Callable[[], dict]],
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


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` under a temporary name, renamed into place (an interrupted write leaves no half file)."""
    from soupjax.io import files
    files.write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


def ensemble_of(evals: Sequence[ModelEval], splits: Sequence[str]) -> ModelEval:
    """The logit ensemble: the mean of the K models' logits (as the official code does)."""
    from soupjax.evaluation.evaluate import metrics_from_logits
    logits = {s: np.mean([ev.logits[s] for ev in evals], axis=0) for s in splits}
    labels = {s: evals[0].labels[s] for s in splits}
    return ModelEval({s: metrics_from_logits(logits[s], labels[s]).metrics() for s in splits}, logits, labels)
