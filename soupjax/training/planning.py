"""Where each ingredient of a sweep goes and what to do with it: fine-tune, skip (finished with the same
config), resume, or (``--overwrite``) train again aside and swap in; every check that needs no training
made first, so that bad input fails before anything is written.

``sweep`` draws the hyperparameters (``ingredient_configs``); this module plans and runs them in a work
directory: ingredients in ``ingredients/NAME``, training state in ``train/NAME``, and the start they are
fine-tuned from in ``ingredients/start`` (``shared_init.save_start``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_collections

from soupjax.cli.errors import InputError
from soupjax.config.base import MAY_DIFFER
from soupjax.io import files


@dataclasses.dataclass
class PlannedRun:
    """One ingredient of ``finetune_all``: where it goes and what to do with it."""
    name: str
    config: ml_collections.ConfigDict
    hparams: dict[str, Any]
    target: files.AnyPath        # the ingredient directory (local, or a gs:// URL as an etils.epath.Path)
    train_dir: files.AnyPath     # its training state
    meta: dict | None = None     # set when it is finished with this config: skipped
    replace: bool = False        # made with another config, and --overwrite: trained aside, then swapped in
    # A finished ingredient a killed swap left aside (files.replaced_name): renamed back before the run.
    restore_from: files.AnyPath | None = None

    @property
    def staged_target(self) -> files.AnyPath:
        # A folder of its own, so that the ingredient keeps its name (meta.json records the directory's
        # name) and is hidden from list_ingredients (names starting with '.') until it is swapped in.
        return self.target.parent / STAGING / self.name

    @property
    def start_dir(self) -> files.AnyPath:
        # Beside the ingredients, also for one trained aside: cooking looks for it there.
        from soupjax.training.shared_init import START_DIR
        return self.target.parent / START_DIR

    @property
    def staged_train_dir(self) -> files.AnyPath:
        return self.train_dir.parent / STAGING / self.name


STAGING = ".replacing"
OVERWRITE_HINT = ("Pass --overwrite to replace it (the old one stays in place until the new one is complete), "
                  "or use another work directory.")


POLL_SECONDS = 5.0  # how often a process waiting for ingredients that others train looks at their leases
LEASE_SUFFIX = ".lease"


def finetune_all(runs: list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]], workdir, ingredients_dir=None,
                 label: str = "", *, overwrite: bool = False, train_root=None) -> list[dict[str, Any]]:
    """Fine-tune every ``(name, config, hparams)`` of ``runs`` that is not finished yet; return their metas.

    Ingredients land in ``ingredients_dir/NAME`` (default ``workdir/ingredients``), training state in
    ``train_root/NAME`` (default ``workdir/train``). A finished ingredient is skipped only when it was
    made with the same config: a changed config in the same directory is refused with the differing
    fields named, because a sweep silently mixing old and new ingredients would make a soup of things
    nobody asked for. With ``overwrite`` it is fine-tuned again aside (``.replacing/``) and swapped in
    only once complete, so an interruption never leaves neither the old ingredient nor the new one.

    Everything that can be checked before training (the work directory is writable, no finished work
    conflicts, the data set is available offline with a usable held-out split, the init file exists)
    is checked for every ingredient first: bad input fails before anything is written.
    """
    workdir = files.as_path(workdir)
    ingredients_dir = files.as_path(ingredients_dir) if ingredients_dir else workdir / "ingredients"
    train_root = files.as_path(train_root) if train_root else workdir / "train"
    return run_plan(plan_runs(runs, ingredients_dir, train_root, overwrite=overwrite), label)


def run_plan(plan: list[PlannedRun], label: str = "", *, poll_seconds: float = POLL_SECONDS) -> list[dict[str, Any]]:
    """Carry out a ``plan_runs`` plan: skip the finished, fine-tune the rest; return every meta.

    Each ingredient is trained under a lease (``io.leases``, at ``lease_path``): an ingredient another
    live process is training (the same command started twice, machines sharing a sweep without
    ``--only``) is skipped with one line naming its holder, and the rest are trained. Then this
    process waits for the ones it skipped, looking at their leases every ``poll_seconds`` (sooner at
    first): each is finished by its holder (skipped), or its lease was released or abandoned
    unfinished (the holder failed or died) and this process trains it. So it returns only when every
    ingredient of the plan is finished: a command's exit status 0 means its whole sweep is there.
    """
    import itertools
    import time

    prefix = f"{label} " if label else ""
    start, metas, held = time.time(), {}, {}
    tags = {i: f"[{prefix}{i + 1}/{len(plan)}] {run.name}" for i, run in enumerate(plan)}
    for i, run in enumerate(plan):
        if run.meta is not None and run.restore_from is None:
            print(f"{tags[i]}: finished earlier, skipped", flush=True)
            metas[i] = run.meta
            continue
        outcome = _run_leased(run, tags[i], start, finished="earlier" if run.meta is not None else None)
        if isinstance(outcome, dict):
            metas[i] = outcome
        else:
            _primary_print(f"{tags[i]}: being trained by {outcome}; skipped for now", flush=True)
            held[i] = outcome
    if held:
        _primary_print(f"{prefix}waiting for {len(held)} ingredient(s) that other processes are training: "
                       + ", ".join(f"{plan[i].name} ({who})" for i, who in held.items()), flush=True)
    for look in itertools.count():
        if not held:
            break
        time.sleep(min(poll_seconds, 0.25 * 2 ** look))  # soon at first: the holder may be about to finish
        for i in list(held):
            outcome = _run_leased(plan[i], tags[i], start, finished=f"by {held[i]}")
            if isinstance(outcome, dict):
                metas[i] = outcome
                del held[i]
    return [metas[i] for i in range(len(plan))]


def lease_path(target: files.AnyPath) -> files.AnyPath:
    """Where the lease of the ingredient ``target`` is: ``.NAME.lease`` beside it (hidden from listings)."""
    return target.parent / f".{target.name}{LEASE_SUFFIX}"


def _run_leased(run: PlannedRun, tag: str, start: float, *, finished: str | None = None) -> dict | str:
    """Train ``run`` holding its lease: its meta, or who holds the lease (a line's worth) when another live
    process does. Planned again once the lease is taken: another process may have finished it, or put
    back an ingredient a killed swap left aside, since the plan was made. ``finished`` says when or by
    whom, in the line printed if it turns out finished."""
    lease, holder = _take_lease(run)
    if lease is None:
        return holder
    try:
        again = plan_run(run.name, run.config, run.hparams, run.target, run.train_dir, overwrite=run.replace)
        if again.restore_from is not None:
            # The ingredient a killed swap left aside is put back (it may be this config's own).
            _on_primary(lambda: os.replace(again.restore_from, again.target), f"soupjax-restore-{again.target}")
            again = plan_run(run.name, run.config, run.hparams, run.target, run.train_dir, overwrite=run.replace)
        if again.meta is not None:
            print(f"{tag}: finished {finished or 'by another process meanwhile'}, skipped", flush=True)
            return again.meta
        return _train(again, tag, start)
    finally:
        lease.release()


class _NoLease:
    """What processes other than 0 hold while process 0 holds an ingredient's lease."""

    def release(self) -> None:
        pass


def _take_lease(run: PlannedRun):
    """``(lease, None)`` when this process (process 0 for all of them) took ``run``'s lease, else
    ``(None, holder)``: with several processes the decision is process 0's, broadcast, so that all of
    them train the same ingredients (their collectives must match)."""
    import jax
    from soupjax.io import leases
    lease, holder = _NoLease(), "another process"
    if jax.process_index() == 0:
        lease = leases.Lease(lease_path(run.target))
        live = lease.acquire()
        if live is not None:
            lease, holder = None, live.describe()
        else:
            lease.keep_alive()
            if lease.took_over is not None:
                print(f"{run.name}: its earlier holder, {lease.took_over.describe()}, is gone; taken over", flush=True)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(lease is not None)))
        if not taken and lease is not None:
            lease.release()
        lease = lease if taken else None
    return lease, holder


def _primary_print(*args, **kwargs) -> None:
    import jax
    if jax.process_index() == 0:
        print(*args, **kwargs)


def _train(run: PlannedRun, tag: str, start: float) -> dict[str, Any]:
    """Fine-tune ``run`` (its lease held), printing what it does."""
    import time

    from soupjax.training import train

    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in run.hparams.items())
    print(f"{tag}: {shown or 'config as given'}" + (" (replacing the one made with another config)"
                                                     if run.replace else ""), flush=True)
    if run.replace:
        meta = _staged_meta(run)
        if meta is None:
            _on_primary(lambda: _discard_other_staging(run), f"soupjax-discard-{run.target}")
            meta = train.train_and_evaluate(run.config, run.staged_train_dir, run.staged_target,
                                            extra_meta=_extra_meta(run), start_dir=run.start_dir)

        def swap_in(run: PlannedRun = run) -> None:
            files.replace_directory(run.staged_train_dir, run.train_dir)
            files.replace_directory(run.staged_target, run.target)
        _on_primary(swap_in, f"soupjax-swap-{run.target}")
    else:
        meta = train.train_and_evaluate(run.config, run.train_dir, run.target, extra_meta=_extra_meta(run),
                                        start_dir=run.start_dir)
    m = meta["metrics"]
    print(f"{tag}: held-out {m['heldout']['accuracy']:.4f}  test {m['test']['accuracy']:.4f}  "
          f"({meta['train_seconds']:.0f}s, {meta['train_images_per_second']:.0f} img/s, setup "
          f"{meta.get('setup_seconds', float('nan')):.0f}s, evaluation "
          f"{meta.get('evaluate_seconds', float('nan')):.0f}s; "
          f"{time.time() - start:.0f}s elapsed) -> {run.target}", flush=True)
    return meta


def plan_runs(runs: list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]], ingredients_dir, train_root,
              *, overwrite: bool = False) -> list[PlannedRun]:
    """What ``finetune_all`` will do with each run (``plan_run``), after every check that needs no
    training (``check_plan``): ``InputError`` before anything is written."""
    plan = [plan_run(name, config, hparams, files.as_path(ingredients_dir) / name, files.as_path(train_root) / name,
                     overwrite=overwrite) for name, config, hparams in runs]
    check_plan(plan)
    return plan


def plan_run(name: str, config: ml_collections.ConfigDict, hparams: Mapping[str, Any], target, train_dir, *,
             overwrite: bool = False, check_init: bool = True) -> PlannedRun:
    """Skip, fine-tune, or (``overwrite``) replace the ingredient ``target``, trained in ``train_dir``.

    Finished work (the ingredient, or else the training state) made with another config is refused,
    naming the differing fields, unless ``overwrite``. ``check_init=False`` leaves out the check that an
    ingredient named by ``init_from`` was not replaced since (when it is yet to be made).
    """
    from soupjax.io import checkpoints
    from soupjax.config.base import refuse_changed
    from soupjax.training.shared_init import START_DIR

    if name == START_DIR:
        raise InputError(f"an ingredient may not be named {name!r}: the start the ingredients are fine-tuned from is "
                         f"written as {files.as_path(target).parent / START_DIR}; give config.name another name")
    run = PlannedRun(name, config, dict(hparams), files.as_path(target), files.as_path(train_dir))
    if not checkpoints.is_ingredient(run.target):
        # A kill inside files.replace_directory (between moving the old one aside and renaming the new
        # one in) leaves no ingredient at the target. The new one, complete in staging with this
        # config, is swapped in by run_plan rather than trained again; else the old one is put back.
        if _staged_meta(run) is not None:
            run.replace = True
            return run
        aside = files.replaced_name(run.target)
        if checkpoints.is_ingredient(aside):
            run.restore_from = aside
    source = run.restore_from or run.target
    finished = checkpoints.is_ingredient(source)
    if finished:
        what = f"the ingredient {run.target}"
        try:
            stored = checkpoints.load_meta(source)
        except checkpoints.IngredientError as e:
            if not overwrite:
                raise checkpoints.IngredientError(f"{e}. {OVERWRITE_HINT}") from e
            run.replace = True  # unreadable: replaced like one made with another config
            return run
    else:
        what, state = f"the training state in {run.train_dir}", run.train_dir / "config.json"
        stored = {"config": json.loads(state.read_text())} if state.is_file() else None
    if stored is None:
        return run
    try:
        refuse_changed(stored.get("config", {}), config, what, ignore=MAY_DIFFER, remedy=OVERWRITE_HINT)
        if check_init:
            _refuse_replaced_init(stored, config, what)
    except InputError:
        if not overwrite:
            raise
        run.replace = True
        return run
    if finished:
        run.meta = stored
    return run


def check_plan(plan: list[PlannedRun], *, check_init: bool = True) -> None:
    """For the runs that will train: their directories can be written, the init file exists
    (``check_init``), the data set is available offline and its held-out split is usable."""
    from soupjax.config.base import fingerprint
    todo = [run for run in plan if run.meta is None]
    for directory in sorted({d for run in todo for d in (run.target.parent, run.train_dir.parent)}):
        problem = files.writable_problem(directory)  # creates nothing: bad input leaves nothing behind
        if problem:
            raise InputError(f"cannot write {directory}: {problem}")
    checked = set()
    for run in todo:
        key = (fingerprint(run.config.data), run.config.init_from.path)
        if key not in checked:
            checked.add(key)
            _check_inputs(run.config, check_init=check_init)


def _check_inputs(config: ml_collections.ConfigDict, *, check_init: bool = True) -> None:
    """The init file exists, and the data set is there offline with a usable held-out split."""
    from soupjax import data
    path = config.init_from.path
    if check_init and path and not files.as_path(path).exists():
        raise InputError(f"config.init_from.path {path} not found (the pretrained weights or the ingredient to "
                         "start from)")
    data.check_available(config.data)
    data.check_heldout(config.data)


def _extra_meta(run: PlannedRun) -> dict[str, Any]:
    """What meta.json records beyond the config: the draw, and which init ingredient it started from."""
    extra = {"hparams": run.hparams}
    init = init_ingredient_id(run.config)
    if init is not None:
        extra["init_ingredient"] = init
    return extra


def init_ingredient_id(config: ml_collections.ConfigDict) -> str | None:
    """A fingerprint of the meta.json of the ingredient ``init_from`` names (None for other inits).

    The config records only the init's path; when the ingredient at that path is replaced (an upstream
    run made again with ``--overwrite``), ingredients fine-tuned from the old one must not pass as
    finished.
    """
    from soupjax.io import checkpoints
    from soupjax.config.base import fingerprint
    path = config.init_from.path
    if not path or not checkpoints.is_ingredient(path):
        return None
    return fingerprint(checkpoints.load_meta(path))


def _refuse_replaced_init(stored: dict, config: ml_collections.ConfigDict, what: str) -> None:
    recorded, now = stored.get("init_ingredient"), init_ingredient_id(config)
    if recorded is not None and now is not None and recorded != now:
        raise InputError(f"{what} was fine-tuned from another ingredient at {config.init_from.path}, which "
                         f"has been replaced since. {OVERWRITE_HINT}")


def _staged_meta(run: PlannedRun) -> dict | None:
    """The meta of an ingredient already complete in staging with this config (an earlier --overwrite run
    stopped before swapping it in), so that it is swapped in instead of trained again."""
    from soupjax.io import checkpoints
    from soupjax.config.base import changed_fields
    if not checkpoints.is_ingredient(run.staged_target):
        return None
    try:
        meta = checkpoints.load_meta(run.staged_target)
    except checkpoints.IngredientError:
        return None  # unreadable staging is not complete: trained again
    return None if changed_fields(meta.get("config", {}), run.config, ignore=MAY_DIFFER) else meta


def _discard_other_staging(run: PlannedRun) -> None:
    """Drop the training state of an abandoned replacement made with yet another config (an earlier
    --overwrite run, stopped): it is soupjax's own unfinished staging, not anyone's finished work."""
    from soupjax.config.base import changed_fields
    state = run.staged_train_dir / "config.json"
    if state.is_file() and changed_fields(json.loads(state.read_text()), run.config):
        files.remove_tree(run.staged_train_dir)


def _on_primary(action, name: str) -> None:
    """``action()`` on process 0 only, then every process waits for it (``name`` labels the barrier).

    The work directory is shared between processes: two renaming or deleting the same directories
    would race, one failing on what the other has just moved.
    """
    import jax
    if jax.process_index() == 0:
        action()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
