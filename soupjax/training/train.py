"""Fine-tune one ingredient: ``train_and_evaluate(config, workdir, ingredient_dir)``.

Resumable: the whole train state is saved by orbax every ``checkpoint_every_steps``; rerunning the same
command restores the latest step and the input pipeline continues from that step's batch. At the end the
ingredient (variables + meta.json) is written atomically, with the fingerprint of the init it started
from so that soups can refuse ingredients of different inits.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from soupjax import data, models
from soupjax.io import checkpoints
from soupjax.io import files
from soupjax.importers.fingerprint import weights_fingerprint
from soupjax.devices import sharding
from soupjax.cli import preemption
from soupjax.cli.errors import InputError
from soupjax.evaluation import evaluate
from soupjax.importers.activation import resolve_activation
from soupjax.models import build_model_from_run_config
from soupjax.cli.progress import Progress
from soupjax.training.shared_init import START_DIR, Variables, base_init, save_start, with_head_init
from soupjax.training.train_step import make_optimizer, make_train_step



def check_same_config(path: files.AnyPath, config: ml_collections.ConfigDict, what: str) -> None:
    """Refuse to resume or reuse work made with another config, naming the fields that differ."""
    from soupjax.config.base import MAY_DIFFER, refuse_changed
    if path.is_file():
        # The fields planning.plan_run lets differ: a resumed run may read its data from elsewhere, or
        # belong to a sweep extended since; config.json keeps the values it was started with.
        refuse_changed(json.loads(path.read_text()), config, f"{what} ({path})", ignore=MAY_DIFFER)
    else:
        files.write_json_atomic(path, files.plain(config))


def total_steps(config: ml_collections.ConfigDict) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    n = data.num_examples(config.data, "train")
    return max(1, int(math.ceil(config.num_epochs * n / config.batch_size)))


def read_metrics(path: files.AnyPath) -> list[dict[str, float]]:
    """The records of a metrics.jsonl, oldest first. A last line cut short by a kill is left out: its
    step is after the checkpoint the run resumes from, so it is trained and written again. Any other
    line that is not JSON is damage a kill cannot cause: ``InputError`` naming the file and the line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise InputError(f"{path}, line {number}: not a JSON record ({e}); the training state is damaged: "
                             "move it away to train this ingredient again from the start") from e
    return records


class MetricsWriter:
    """Metrics as JSON lines (always) and TensorBoard summaries (when TensorFlow is importable).

    On a local work directory each record is appended to metrics.jsonl as it comes. An object store
    (``gs://``) cannot append: the file is kept here and uploaded whole by ``flush``, which training
    calls at every checkpoint (and at its end), and TensorBoard's event files are written to a local
    folder and uploaded beside it. A kill loses only the records after the last flush, whose steps come
    after the checkpoint the rerun resumes from: they are trained and written again.
    """

    def __init__(self, workdir: files.AnyPath, start_step: int = 0):
        self.path = workdir / "metrics.jsonl"
        self._url = files.is_url(workdir)
        self._text: str | None = None  # on an object store: the whole file, uploaded by flush()
        self.pending = False  # records not uploaded yet (object stores only)
        if jax.process_index() == 0 and self.path.exists():
            # After a resume, drop the lines of steps that are being trained again. Rewritten under a
            # temporary name and renamed: a kill during the rewrite must not lose the earlier lines
            # (the held-out curve, which the plateau rule decides on, is read back from them).
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= start_step)
            files.write_atomic(self.path, lambda tmp: tmp.write_text(kept))
            self._text = kept
        self._tb = None
        self._tb_local = self._tb_remote = None
        if jax.process_index() == 0:
            try:
                import tensorflow as tf
            except ImportError:  # pragma: no cover - tensorflow is a runtime dependency
                return
            self._tb_remote = workdir / "tensorboard"
            if self._url:
                # TensorFlow would write gs:// through its own GCS file system (not gcsfs): written
                # locally instead and uploaded by flush(), through the same layer as every other file.
                import tempfile
                self._tb_local = Path(tempfile.mkdtemp(prefix="soupjax-tensorboard-"))
            self._tb = tf.summary.create_file_writer(str(self._tb_local or self._tb_remote))
            self._tf = tf

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if jax.process_index() != 0:
            return
        line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
        if self._url:
            self._text = (self._text or "") + line
            self.pending = True
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._tb is not None:
            with self._tb.as_default():
                for k, v in metrics.items():
                    self._tf.summary.scalar(k, float(v), step=int(step))
            self._tb.flush()

    def flush(self) -> None:
        """On an object store: upload metrics.jsonl and the TensorBoard files written since the last
        flush (each whole); nothing to do on local disk, where every record is already appended."""
        if not self.pending:
            return
        text = self._text or ""
        files.write_atomic(self.path, lambda tmp: tmp.write_text(text))
        if self._tb_local is not None:
            for event_file in sorted(self._tb_local.iterdir()):
                target = self._tb_remote / event_file.name
                files.write_atomic(target, lambda tmp, f=event_file: tmp.write_bytes(f.read_bytes()))
        self.pending = False

    def close(self) -> None:
        """Upload what is left (``flush``) and remove the local TensorBoard folder of an object store."""
        try:
            self.flush()
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            if self._tb_local is not None:
                shutil.rmtree(self._tb_local, ignore_errors=True)
                self._tb_local = None


@dataclasses.dataclass
class TrainResult:
    """What ``train`` hands to evaluation: the trained variables on the host and how training went."""
    variables: Variables
    model: Any
    init_fingerprint: str
    start_fingerprint: str  # of every variable the run started from (init_from, then the head init)
    steps: int
    start_step: int
    seconds: float
    # Before the first step: model, init and head (a linear probe, unless cached), start, data pipeline.
    setup_seconds: float
    images_per_second: float  # steady state: from the end of the first step to the end (nan if < 2 steps)
    heldout_curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, accuracy)
    decay_start: int | None = None  # lr_schedule='plateau': where the cool-down began


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          start_dir: str | os.PathLike | None = None) -> TrainResult:
    # Long: the loop's state (train state, throughput clock, held-out curve, plateau length, checkpoints)
    # lives across its steps and its interruption; one function keeps the order of those steps visible.
    """The resumable training of one ingredient in ``workdir``, without its evaluation or saving.

    Rerunning with the same config continues from the latest checkpoint. This is the loop whose rate
    experiments/bench_train.py measures: input pipeline, host-to-device copies, step, checkpoints.
    With ``start_dir``, the start (init and head init) is written there first, unless the start there
    already has its fingerprint (``shared_init.save_start``): cooking reads it instead of rebuilding it.
    """
    setup_start = time.time()
    workdir = files.absolute(workdir)  # a gs:// URL stays one (an etils.epath.Path)
    if not files.is_url(workdir):  # an object store has no folders to make
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.data_mesh()
    sharding.check_global_batch_size(config.batch_size)
    # The activation is resolved here, once: the GELU the init checkpoint was trained with (a config that
    # contradicts it is refused before config.json is written); meta.json records what the model runs.
    model = build_model_from_run_config(config, resolve_activation(config))
    check_same_config(workdir / "config.json", config, f"the training state in {workdir}")

    base = base_init(config, model)
    fingerprint = weights_fingerprint(base["params"])
    init = with_head_init(config, base, model, cache_dir=files.as_path(start_dir).parent if start_dir is not None else None)
    # The exact start, head included: merges take displacements from it, and the linear-probe head is
    # not promised bit-exact when rebuilt elsewhere, so cooking checks the rebuilt one against this.
    start_fingerprint = weights_fingerprint(init)
    if start_dir is not None:
        save_start(start_dir, init, config=config, init_fingerprint=fingerprint, start_fingerprint=start_fingerprint,
                   activation=models.activation(model))
    max_steps = steps = total_steps(config)
    tx, hparams = make_optimizer(config, steps)
    plateau = _PlateauSchedule(config, workdir, max_steps, hparams)

    state = {"step": jnp.zeros((), jnp.int32), "params": init["params"], "opt_state": tx.init(init["params"])}
    if "batch_stats" in init:
        state["batch_stats"] = init["batch_stats"]
    state = sharding.replicate(state, mesh)
    ckpts = checkpoints.TrainingCheckpoints(workdir / "checkpoints", save_every=config.checkpoint_every_steps)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpts.restore(abstract)
    if restored is not None:
        state = restored
        print(f"{workdir.name}: resumed from step {int(state['step'])} ({ckpts.directory})", flush=True)
    start_step = int(state["step"])
    if start_step > steps:
        raise ValueError(f"{ckpts.directory} holds step {start_step}, beyond this config's {steps} steps")
    steps = plateau.resume(start_step)

    train_step = make_train_step(model, tx, mesh)
    rng = jax.random.PRNGKey(config.seed)
    writer = MetricsWriter(workdir, start_step)
    curve = HeldoutCurve(config, model, mesh, writer, start_step) if config.eval_every_steps > 0 else None
    batches = data.train_batches(config.data, config.batch_size, seed=config.seed, start_step=start_step)
    progress = Progress(steps, f"train {workdir.name}", unit="steps", every=10.0,
                        total_is_cap=plateau.undecided)
    progress.done = start_step
    history: list[dict[str, float]] = []
    t0 = time.time()
    setup_seconds = t0 - setup_start
    # Throughput is measured from the end of the first step on, so that compilation and the first
    # fill of the shuffle buffer do not count as training speed.
    steady_start, steady_step = None, start_step
    # SIGTERM or Ctrl-C (cli/preemption): the step under way is finished, its checkpoint saved, and the
    # run stops there, every process at the same step; the rerun resumes from it.
    vote, stopped = preemption.StopVote(lagged=True), 0
    step = start_step
    with preemption.boundaries(after=f"after the last step of {workdir.name} (its checkpoint is saved)"):
        try:
            while step < steps:
                # Dispatch is asynchronous: the next batch is read and copied while this step computes.
                batch = sharding.shard_batch(next(batches), mesh)
                state, metrics = train_step(state, batch, rng, hparams)
                if steady_start is None:
                    jax.block_until_ready(metrics)
                    steady_start, steady_step = time.time(), step + 1
                if (step + 1) % config.log_every_steps == 0 or step + 1 == steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not np.isfinite(metrics["loss"]):
                        raise FloatingPointError(f"loss is {metrics['loss']} at step {step + 1}; "
                                                 "lower the learning rate")
                    if step + 1 > steady_step:
                        rate = (step + 1 - steady_step) * config.batch_size / max(time.time() - steady_start, 1e-9)
                        metrics["images_per_second"] = rate
                    writer.write(step + 1, metrics)
                    history.append({"step": step + 1, **metrics})
                progress(1, **({"loss": history[-1]["loss"]} if history else {}))
                if curve is not None and (step + 1) % config.eval_every_steps == 0 and step + 1 < steps:
                    # The evaluation opens the data set while a checkpoint may still be finalising in
                    # orbax's thread; under tfds.testing.mock_data the two race on the mocked file system.
                    ckpts.wait()
                    curve.evaluate(step + 1, state)
                    steps = plateau.update(step + 1, curve.points)
                    progress.total, progress.total_is_cap = steps, plateau.undecided
                if writer.pending and ckpts.should_save(step + 1):
                    writer.flush()  # before the checkpoint: a committed step never lacks its records
                ckpts.save(step + 1, state)
                step += 1
                stopped = vote()
                if stopped:
                    break
            else:
                stopped = vote.settle()
        except BaseException:
            # Interrupted (a second signal, an error): let a checkpoint already being written finish, so
            # that the rerun resumes from it instead of from the one before.
            ckpts.close()
            writer.close()
            raise
        with preemption.saving():
            jax.block_until_ready(state)
            train_time = time.time() - t0
            writer.close()
            if ckpts.latest_step() != step:
                ckpts.save(step, state, force=True)
            ckpts.close()
        if stopped:
            raise preemption.stop(stopped, f"at step {step} of {steps} of {workdir.name} (its checkpoint is saved "
                                           f"in {ckpts.directory})")

    release_in_background(batches)
    variables = {"params": state["params"]}
    if "batch_stats" in state:
        variables["batch_stats"] = state["batch_stats"]
    return TrainResult(variables=jax.device_get(variables), model=model, init_fingerprint=fingerprint,
                       start_fingerprint=start_fingerprint, steps=steps, start_step=start_step, seconds=train_time,
                       setup_seconds=setup_seconds,
                       images_per_second=history[-1].get("images_per_second", float("nan")) if history
                       else float("nan"),
                       heldout_curve=list(curve.points) if curve else [], decay_start=plateau.decay_start)


def release_in_background(iterator) -> None:
    """Closes a finished training pipeline on a daemon thread rather than on the caller's.

    Deleting a long-lived tf.data iterator waits for its autotuning thread (``Model::OptimizeLoop``),
    which sleeps up to a minute between optimisations and is not woken by the deletion: 0 to 66 s,
    at random, between two ingredients of a sweep (docs/benchmarks.md). Nothing waits for that here:
    the thread holds the last reference, and a process that ends first loses nothing."""
    close = getattr(iterator, "close", None)  # a generator; a plain iterator has nothing to release
    if close is not None:
        threading.Thread(target=close, daemon=True, name="release the training pipeline").start()


class HeldoutCurve:
    """The held-out accuracy every ``eval_every_steps`` during training: the learning curve that shows
    whether a run has converged, and what the plateau schedule decides on. Evaluations made before a
    resume are read back from metrics.jsonl."""

    def __init__(self, config: ml_collections.ConfigDict, model, mesh, writer: MetricsWriter, start_step: int):
        self._config, self._writer = config, writer
        self._evaluator = evaluate.for_model(model, mesh)
        self.points: list[tuple[int, float]] = []
        if writer.path.exists():
            for record in read_metrics(writer.path):
                if "heldout_accuracy" in record and record["step"] <= start_step:
                    self.points.append((int(record["step"]), float(record["heldout_accuracy"])))

    def evaluate(self, step: int, state: Mapping[str, Any]) -> float:
        variables = {k: state[k] for k in ("params", "batch_stats") if k in state}
        batches = data.eval_batches(self._config.data, "heldout", self._config.eval_batch_size)
        accuracy = self._evaluator(variables, batches).accuracy
        self.points.append((step, accuracy))
        self._writer.write(step, {"heldout_accuracy": accuracy})
        logging.info("step %d: held-out accuracy %.4f", step, accuracy)
        return accuracy


class _PlateauSchedule:
    """The length of a run: ``max_steps`` for a cosine schedule; with ``lr_schedule='plateau'``, up to
    the step where the held-out curve levels off plus ``plateau.cooldown_steps`` (never beyond
    ``max_steps``: a run that does not level off cools down over its last steps)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: files.AnyPath, max_steps: int, hparams: dict):
        from soupjax.training.plateau import PlateauRule
        self.active = config.lr_schedule == "plateau"
        self.max_steps, self.hparams = max_steps, hparams
        self.path = workdir / "plateau.json"
        self.decay_start: int | None = None
        self.length = max_steps  # the run's length as decided so far
        if not self.active:
            return
        if config.eval_every_steps <= 0:
            raise ValueError("lr_schedule='plateau' decides on the held-out curve: set eval_every_steps > 0")
        self.rule = PlateauRule(float(config.plateau.min_delta), int(config.plateau.patience))
        self.cooldown = min(int(config.plateau.cooldown_steps), max_steps)
        self._set(None)

    @property
    def undecided(self) -> bool:
        """True while the run's length is only its cap: a plateau run whose rule has not fired yet."""
        return self.active and self.decay_start is None

    def _set(self, decay_start: int | None) -> int:
        self.decay_start = decay_start
        start = decay_start if decay_start is not None else self.max_steps - self.cooldown
        self.hparams["decay_start"] = np.float32(start)
        self.hparams["decay_steps"] = np.float32(max(self.cooldown, 1))
        self.length = min(self.max_steps, start + self.cooldown)
        return self.length

    def resume(self, start_step: int) -> int:
        """The run's length after a restart at ``start_step``."""
        from soupjax.training.plateau import read_decision
        if not self.active:
            return self.length
        decided = read_decision(self.path)
        # A decision taken after the checkpoint we resume from is taken again, on the same curve.
        return self._set(decided if decided is not None and decided <= start_step else None)

    def update(self, step: int, points: list[tuple[int, float]]) -> int:
        """After an evaluation at ``step``: the run's length, cooling down from here if the curve levelled off."""
        from soupjax.training.plateau import write_decision
        if (self.active and self.decay_start is None and step < self.max_steps - self.cooldown
                and self.rule.levelled_off([a for _, a in points])):
            write_decision(self.path, step, points)
            logging.info("held-out accuracy levelled off at step %d: cooling down over %d steps", step,
                         self.cooldown)
            self._set(step)
        return self.length


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       ingredient_dir: str | os.PathLike | None = None,
                       extra_meta: Mapping[str, Any] | None = None,
                       start_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fine-tune one ingredient in ``workdir`` (resumable) and write it to ``ingredient_dir``, and the
    start it was fine-tuned from to ``start_dir`` (default: ``start`` beside the ingredient).

    Returns the ingredient's meta.json contents.
    """
    wall_start = time.time()
    workdir = files.absolute(workdir)
    ingredient_dir = files.absolute(ingredient_dir or workdir / "ingredient")
    sharding.check_global_batch_size(config.eval_batch_size)
    data.check_heldout(config.data)  # an ingredient's held-out accuracy is what soups rank by
    start_dir = files.absolute(start_dir if start_dir is not None else ingredient_dir.parent / START_DIR)
    if start_dir == ingredient_dir:
        raise InputError(f"{ingredient_dir}: an ingredient may not take the place of the start it is fine-tuned from "
                         "(written there by default): give the ingredient another name")
    trained = train(config, workdir, start_dir)
    model, variables, mesh = trained.model, trained.variables, sharding.data_mesh()

    evaluate_start = time.time()
    evaluator = evaluate.for_model(model, mesh)
    metrics, logits = {}, {}
    for split in ("heldout", "test"):
        result = evaluator(variables, data.eval_batches(config.data, split, config.eval_batch_size), keep_logits=True)
        metrics[split] = result.metrics()
        # Kept with the ingredient so that cooking soups never evaluates an ingredient twice.
        logits[f"{split}/logits"], logits[f"{split}/labels"] = result.logits, result.labels
        logging.info("%s: %s accuracy %.4f loss %.4f", ingredient_dir.name, split, result.accuracy, result.loss)

    meta = {
        "name": ingredient_dir.name,
        "config": config.to_dict(),
        "init_fingerprint": trained.init_fingerprint,
        "start_fingerprint": trained.start_fingerprint,
        "data_fingerprint": data.eval_fingerprint(config.data),
        "init_from": config.init_from.path,
        "activation": models.activation(model),  # e.g. 'gelu_tanh' when init_from is a .npz
        "metrics": metrics,
        "steps": trained.steps,
        "heldout_curve": [list(point) for point in trained.heldout_curve],
        "decay_start": trained.decay_start,
        "resumed_from_step": trained.start_step,
        "train_seconds": trained.seconds,
        # Where the rest of the wall time went: the time between two ingredients of a sweep was unexplained.
        "setup_seconds": trained.setup_seconds,
        "evaluate_seconds": time.time() - evaluate_start,
        "wall_seconds": time.time() - wall_start,
        "train_images_per_second": trained.images_per_second,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        **(dict(extra_meta) if extra_meta else {}),
    }
    # Every process takes part in the save (orbax syncs them); the primary one writes the metadata.
    checkpoints.save_ingredient(ingredient_dir, variables, meta, arrays=logits if jax.process_count() == 1 else None)
    if jax.process_index() == 0:
        if not config.keep_train_checkpoints:
            files.remove_tree(workdir / "checkpoints")
    return meta
