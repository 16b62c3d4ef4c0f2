"""Runs killed with SIGKILL, at random moments and in the middle of writes, or stopped by SIGTERM and
Ctrl-C, resume from their last complete state and end as an uninterrupted run does: fine-tuning (bit for
bit), a sweep (finished ingredients skipped), cooking (no partial soup, the same report) and the whole
study.

SIGKILL is what the OOM killer sends, and a preempted VM at the end of its grace period: no handler runs,
nothing is flushed or cleaned, so what survives is only what was already on disk. SIGTERM (the
preemption notice) and SIGINT (Ctrl-C) stop a command at its next step boundary with its work saved
(soupjax.cli.preemption): exit status 143 or 130, one line naming the step, and the rerun resumes there.
Every command runs as a user would run it.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from soupjax.io import checkpoints
from soupjax.training import train
from test_determinism import assert_bit_identical, report_numbers
from conftest import cook_all_command
from test_experiment import check_finished_study

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600
# Fine-tuning long enough to be killed between checkpoints several times.
STEPS, EVERY = 40, 5


class Run:
    """A command started in the background; its output goes to files (a pipe nobody reads would block it)."""

    def __init__(self, cmd: list[str], log: Path, **env: str):
        self.log = log
        self._files = [open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
                                     stdout=self._files[0], stderr=self._files[1])

    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text()

    def preempted_line(self) -> str:
        """The one line a command stopped by SIGTERM or SIGINT ends with (stderr)."""
        lines = [line for line in self.log.with_suffix(".err").read_text().splitlines() if ": preempted by " in line]
        assert len(lines) == 1, f"{self.log.name}: {lines}\n{self.stderr_tail()}"
        return lines[0]

    def stderr_tail(self) -> str:
        return self.log.with_suffix(".err").read_text()[-3000:]

    def wait_until(self, ready: Callable[[], bool]) -> bool:
        """Polls ``ready`` every 10 ms until it holds (True) or the process has ended (False). (Every 2 ms
        the poll itself took 12% of a core, on a 2-core machine, from the run it watches.)"""
        deadline = time.time() + TIMEOUT
        while not ready():
            if self.proc.poll() is not None:
                return False
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"{self.log.name}: still waiting after {TIMEOUT}s")
            time.sleep(0.01)
        return True

    def kill(self) -> bool:
        """SIGKILL now; True when it died of it (False: it had ended already)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._close()
        return self.proc.returncode == -signal.SIGKILL

    def stop(self, signum: int) -> int:
        """SIGTERM or SIGINT now (asserted still running), then the exit status once it has stopped."""
        assert self.proc.poll() is None, f"{self.log.name}: ended before its {signal.Signals(signum).name}"
        self.proc.send_signal(signum)
        return self.ended()

    def ended(self) -> int:
        self.proc.wait(TIMEOUT)
        self._close()
        return self.proc.returncode

    def finish(self) -> str:
        """Waits for a normal end and returns stdout."""
        assert self.ended() == 0, f"{self.log.name}: exit {self.proc.returncode}\n{self.stderr_tail()}"
        return self.stdout()

    def _close(self) -> None:
        self.proc.wait(TIMEOUT)
        for f in self._files:
            f.close()


def _finetune(workdir: Path, data_dir: str, options: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "soupjax.finetune", "--config", f"configs/fashion_mnist_vit.py:{options}",
            f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", *flags]


def _last_logged(metrics: Path) -> int:
    """The last step in a metrics.jsonl (0 when there is none yet)."""
    try:
        return max((int(r["step"]) for r in train.read_metrics(metrics)), default=0)
    except FileNotFoundError:
        return 0


def _visible(directory: Path) -> list[Path]:
    """What a sweep, a soup or a user listing ``directory`` sees (staging directories start with '.')."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def _without_rate(metrics: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in train.read_metrics(metrics)]


@pytest.mark.slow
@pytest.mark.runs_first
def test_finetune_killed_at_random_moments_ends_as_an_uninterrupted_run(tmp_path, fashion_mnist_data_dir):
    long = (f"--config.total_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}")
    # The uninterrupted run first: the killed ones then take its compiled programs from the test run's XLA
    # cache instead of compiling them beside it.
    Run(_finetune(tmp_path / "reference", fashion_mnist_data_dir, "testing", *long), tmp_path / "reference").finish()
    work = tmp_path / "killed"
    cmd = _finetune(work, fashion_mnist_data_dir, "testing", *long)
    train_dir, ingredient = work / "train" / "ingredient", work / "ingredients" / "ingredient"
    metrics, ckpt_dir = train_dir / "metrics.jsonl", train_dir / "checkpoints"
    rng = random.Random(10)
    kills: list[str] = []  # where each kill landed: the failure messages show the sequence

    def committed() -> list[int]:
        return sorted(int(p.name) for p in _visible(ckpt_dir) if p.name.isdigit())

    def writing_ingredient() -> bool:
        return ingredient.parent.is_dir() and any(p.name.startswith(".ingredient.tmp") for p in ingredient.parent.iterdir())

    def kill(name: str, *, after: Callable[[], bool], delay: float, cap: Callable[[], bool],
             signum: int = signal.SIGKILL, resumes_from: int | None = None) -> int | None:
        """Starts the command, waits for ``after``, then SIGKILLs it ``delay`` seconds later or as soon as
        ``cap`` holds (so that the kill comes before the end, however fast or slow the machine).

        With ``signum`` SIGTERM or SIGINT, the run must stop by itself after the step under way: exit
        status 128 + signum, one line naming the step N, a committed checkpoint of N, and no step trained
        past it. Returns N. ``resumes_from``: the run must say it resumed from that step."""
        run = Run(cmd, tmp_path / name)
        assert run.wait_until(after), f"{name}: ended before its kill; kills so far {kills}"
        if resumes_from is not None:
            assert f"ingredient: resumed from step {resumes_from} (" in run.stdout(), (kills, run.stdout())
        at = time.time() + delay
        run.wait_until(lambda: time.time() >= at or cap())
        stopped_at = None
        if signum == signal.SIGKILL:
            assert run.kill(), f"{name}: ended before its kill; kills so far {kills}"
        else:
            sent_at = _last_logged(metrics)
            status = run.stop(signum)
            assert status == 128 + signum, f"{name}: exit {status}, kills so far {kills}\n{run.stderr_tail()}"
            line = run.preempted_line()
            found = re.fullmatch(rf"soupjax\.finetune: preempted by {signal.Signals(signum).name} at step (\d+) of "
                                 rf"{STEPS} of ingredient \(its checkpoint is saved in {re.escape(str(ckpt_dir))}\); "
                                 "rerun the same command to resume", line)
            assert found, line
            stopped_at = int(found.group(1))
            # It stopped after the step under way when the signal came (the last logged then, or the one
            # after it), with that step's checkpoint: nothing trained is lost, so the rerun repeats none.
            assert sent_at <= stopped_at <= sent_at + 1, (sent_at, line)
            assert _last_logged(metrics) == stopped_at and stopped_at in committed(), (committed(), line)
        how = signal.Signals(signum).name
        kills.append(f"{name}: {how} at step {_last_logged(metrics)}, checkpoints {committed()}")
        # Never a half-written ingredient where a sweep or a soup would take it for a finished one.
        # Beside it, the start the run was fine-tuned from (written whole before training, or not at all).
        assert [p.name for p in _visible(ingredient.parent) if p.name != "start"] in ([], ["ingredient"]), kills
        start = ingredient.parent / "start"
        assert not start.exists() or checkpoints.is_start(start) and checkpoints.is_ingredient(start), kills
        assert not ingredient.exists() or checkpoints.is_ingredient(ingredient), kills
        return stopped_at

    # 1. While step 10's checkpoint is being written: the run kills itself once orbax has started writing
    #    it under its temporary name, before the rename that commits it (tests/kill_in_checkpoint.py).
    assert cmd[1:3] == ["-m", "soupjax.finetune"]
    run = Run([sys.executable, str(ROOT / "tests" / "kill_in_checkpoint.py"), "10", *cmd[3:]], tmp_path / "kill1")
    assert run.ended() == -signal.SIGKILL, run.stderr_tail()
    left = sorted(p.name for p in ckpt_dir.iterdir())
    assert "10.orbax-checkpoint-tmp" in left and "10" not in left and "5" in left, left
    kills.append(f"kill1: writing checkpoint 10, at step {_last_logged(metrics)}")
    # 2-4. In training, at a random moment after the run has gone past where the last one was killed
    #      (the lines up to there may be the last run's, which the new one drops when it resumes): Ctrl-C,
    #      a preemption notice (SIGTERM), then SIGKILL. The runs after the first two resume from the step
    #      at which these stopped.
    stopped_at = None
    for name, last, signum in (("kill2", 18, signal.SIGINT), ("kill3", 27, signal.SIGTERM),
                               ("kill4", 36, signal.SIGKILL)):
        progress = _last_logged(metrics)
        stopped_at = kill(name, after=lambda: _last_logged(metrics) > progress, delay=rng.uniform(0.0, 0.5),
                          cap=lambda: _last_logged(metrics) >= max(last, progress + 1), signum=signum,
                          resumes_from=stopped_at)
    # 5. After the last step: in the final checkpoint, the evaluation, or at the latest while the
    #    ingredient is being written.
    kill("kill5", after=lambda: _last_logged(metrics) >= STEPS, delay=rng.uniform(0.0, 2.0), cap=writing_ingredient)
    Run(cmd, tmp_path / "final").finish()

    assert len(kills) == 5, kills
    meta = checkpoints.load_meta(ingredient)
    want = checkpoints.load_meta(tmp_path / "reference" / "ingredients" / "ingredient")
    assert meta["steps"] == want["steps"] == STEPS
    assert meta["resumed_from_step"] > 0, f"the last run started afresh instead of resuming: {kills}"
    # Bit for bit: the data order, augmentation and dropout keys depend only on (seed, step), and the
    # checkpoint holds the whole train state (step, parameters, optimizer state) exactly.
    assert_bit_identical(checkpoints.load_variables(ingredient),
                         checkpoints.load_variables(tmp_path / "reference" / "ingredients" / "ingredient"),
                         f"killed {kills}")
    assert meta["metrics"] == want["metrics"]
    # Every step logged once, in order, with the uninterrupted run's numbers.
    logged = _without_rate(metrics)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert logged == _without_rate(tmp_path / "reference" / "train" / "ingredient" / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.runs_first
def test_sweep_killed_between_ingredients_skips_the_finished_one(tmp_path, fashion_mnist_data_dir,
                                                                   finetuned_workdir):
    # The same command as the finetuned_workdir fixture's uninterrupted sweep, in another work directory.
    cmd = _finetune(tmp_path, fashion_mnist_data_dir, "testing,sweep=2")
    first, second = tmp_path / "ingredients" / "sweep0_000", tmp_path / "ingredients" / "sweep0_001"
    run = Run(cmd, tmp_path / "killed")
    assert run.wait_until(lambda: checkpoints.is_ingredient(first)), run.stderr_tail()
    assert run.kill(), "the sweep ended before it could be killed between its ingredients"
    assert not checkpoints.is_ingredient(second)
    written, start_written = _mtimes(first), _mtimes(tmp_path / "ingredients" / "start")
    out = Run(cmd, tmp_path / "resumed").finish()
    assert "[1/2] sweep0_000: finished earlier, skipped" in out
    assert "[2/2] sweep0_001: " in out and "[2/2] sweep0_001: finished earlier" not in out
    assert _mtimes(first) == written, "the finished ingredient was written again"
    assert _mtimes(tmp_path / "ingredients" / "start") == start_written, "the same start was written again"
    for mine in (first, second):
        theirs = finetuned_workdir["workdir"] / "ingredients" / mine.name
        assert_bit_identical(checkpoints.load_variables(mine), checkpoints.load_variables(theirs), mine.name)


@pytest.mark.slow
@pytest.mark.runs_first
def test_soup_killed_while_writing_leaves_no_partial_soup_and_resumes(tmp_path, finetuned_workdir, cooked_all,
                                                                      fashion_mnist_data_dir):
    # The reference: the same command, uninterrupted (conftest's cooked_all, shared with tests/test_api.py).
    def cook(out: str) -> list[str]:
        return cook_all_command(finetuned_workdir, fashion_mnist_data_dir, tmp_path / out)

    out = tmp_path / "killed"
    run = Run(cook("killed"), tmp_path / "killed")

    def writing_a_later_soup() -> bool:
        # A soup is written under '.NAME.tmp-*' and renamed into place; uniform is cooked first, so a
        # later soup being written means there is a finished one to skip on the rerun.
        return out.is_dir() and any(p.name.startswith(".") and ".tmp-" in p.name and not p.name.startswith(".uniform")
                                    for p in out.iterdir())

    assert run.wait_until(writing_a_later_soup), "never saw a soup being written"
    assert run.kill(), "the cook ended before it could be killed"
    finished = [p.name for p in _visible(out) if p.name != "cache"]
    for name in finished:
        assert checkpoints.is_ingredient(out / name), f"a partial soup is visible: {out / name}"
    assert "uniform" in finished and not (out / "report.json").exists()
    written = {name: _mtimes(out / name) for name in finished}

    # The rerun is stopped by a preemption notice (SIGTERM) while it writes its first new soup: that soup
    # is finished and kept, the cook stops before the next dish, and nothing half-written is visible.
    # (The killed run's staging directory is still there: only one the rerun started counts.)
    left = {p.name for p in out.iterdir()}

    def writing_a_new_soup() -> bool:
        return any(p.name.startswith(".") and ".tmp-" in p.name and p.name not in left
                   and p.name[1:].split(".tmp-")[0] not in finished for p in out.iterdir())

    resumed = Run(cook("killed"), tmp_path / "resumed")
    assert resumed.wait_until(writing_a_new_soup), f"the rerun wrote no new soup: {resumed.stderr_tail()}"
    assert resumed.stop(signal.SIGTERM) == 143, resumed.stderr_tail()
    line = resumed.preempted_line()
    stopped = re.fullmatch(rf"soupjax\.soup: preempted by SIGTERM after dish \d+ of \d+ \((\w+)\): every soup "
                           rf"cooked is kept in {re.escape(str(out))}; rerun the same command to resume", line)
    assert stopped, line
    for name in finished:
        assert f"{name}: cooked earlier, reused" in resumed.stdout()
    kept = [p.name for p in _visible(out) if p.name != "cache"]
    for name in kept:
        assert checkpoints.is_ingredient(out / name), f"a partial soup is visible: {out / name}"
    assert set(kept) > set(finished) and not (out / "report.json").exists(), (finished, kept, line)
    written = {name: _mtimes(out / name) for name in kept}

    again = Run(cook("killed"), tmp_path / "again").finish()
    for name in kept:
        assert f"{name}: cooked earlier, reused" in again
        assert _mtimes(out / name) == written[name], f"{name} was cooked again"
    # Two processes cooked the same ingredients with the same options: the same report and every soup and
    # merge bit for bit (DARE's random masks included: they are drawn from the seed).
    assert report_numbers(out / "report.json") == report_numbers(cooked_all / "report.json")
    rows = json.loads((cooked_all / "report.json").read_text())["soups"]
    assert {r["name"] for r in rows} >= {"uniform", "greedy", "pruned", "learned_global", "learned_layer", "ensemble",
                                         "ties", "dare_linear", "dare_ties", "model_stock", "wise_ft_uniform"}
    saved = [soup for soup in _visible(cooked_all) if checkpoints.is_ingredient(soup)]
    assert {soup.name for soup in saved} == {r["name"] for r in rows if r["kind"] in ("soup", "merge")}
    for soup in saved:
        assert_bit_identical(checkpoints.load_variables(out / soup.name), checkpoints.load_variables(soup), soup.name)


# configs/fashion_mnist_vit.py with its stage options, shrunk to seconds per stage: the study's code
# paths (plateau rule, linear probe, every recipe) on a tiny model, so that it can be killed in each stage.
_TINY_STUDY = '''
import importlib.util

_spec = importlib.util.spec_from_file_location("fashion_mnist_vit", {path!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    c = _base.get_config(arg)
    c.model = {{"name": "vit-testing", "patch_size": 4}}
    c.batch_size, c.eval_batch_size, c.warmup_steps = 16, 500, 2
    c.total_steps, c.checkpoint_every_steps, c.log_every_steps = 16, 4, 1
    c.eval_every_steps, c.plateau.cooldown_steps = 4, 4
    c.data.heldout, c.data.shuffle_buffer = 256, 256
    c.data.shifts = []  # the report without shift columns: a kill test, not a robustness one
    c.data.test_examples = 1000  # of the 5,000 test images of classes 5-9: every soup is scored on them
    c.linear_probe.num_examples, c.linear_probe.steps = 128, 10
    return c
'''


@pytest.mark.slow
@pytest.mark.runs_first
def test_study_killed_in_each_stage_resumes_to_the_same_report(tmp_path, fashion_mnist_data_dir):
    config = tmp_path / "tiny_study.py"
    config.write_text(_TINY_STUDY.format(path=str(ROOT / "configs" / "fashion_mnist_vit.py")))

    def study(workdir: Path) -> list[str]:
        return [sys.executable, "-m", "soupjax.experiment", "--quick", f"--config={config}", "--ingredients=2",
                f"--workdir={workdir}", f"--data_dir={fashion_mnist_data_dir}"]

    # The uninterrupted study first, to its end: the killed runs then find every program it compiled in the
    # test run's XLA cache instead of compiling them again beside it (two cores, and the other worker busy).
    reference = Run(study(tmp_path / "reference"), tmp_path / "reference").finish()
    # It is also the suite's end-to-end run of the main job at a tiny size. Its test split is the first
    # 1,000 test images (data.test_examples), 492 of them of classes 5-9.
    check_finished_study(tmp_path / "reference", reference, ingredients=2, test_examples=492)
    work = tmp_path / "killed"
    upstream, second = work / "upstream" / "train", work / "train" / "sweep0_001"

    def past_a_checkpoint(train_dir: Path) -> bool:
        """Killed there, the run has a committed checkpoint of a later step than the first one (which
        orbax saves whatever the interval) to resume from."""
        ckpts = train_dir / "checkpoints"
        done = [int(p.name) for p in _visible(ckpts) if p.name.isdigit() and int(p.name) >= 4]
        return bool(done) and _last_logged(train_dir / "metrics.jsonl") > max(done)

    stages = [
        ("upstream", lambda: past_a_checkpoint(upstream)),
        ("ingredients", lambda: checkpoints.is_ingredient(work / "ingredients-seed0" / "sweep0_000")
         and past_a_checkpoint(second)),
        ("cooking", lambda: checkpoints.is_ingredient(work / "soups-seed0" / "uniform")),
    ]
    outputs = []
    for stage, reached in stages:
        run = Run(study(work), tmp_path / f"kill-{stage}")
        assert run.wait_until(reached), f"the study ended before it reached its {stage}: {run.stderr_tail()}"
        assert run.kill(), f"the study ended before it was killed in its {stage}"
        outputs.append(run.stdout())
    out = Run(study(work), tmp_path / "resumed").finish()
    # Each rerun went on from where the last one was killed.
    assert "[1/3] upstream: finished earlier" in outputs[2]
    assert "sweep0_000: finished earlier, skipped" in outputs[2] and "sweep0_001: finished earlier" not in outputs[2]
    assert "sweep0_001: finished earlier, skipped" in out and "uniform: cooked earlier, reused" in out
    for name in ("upstream/ingredient", "ingredients-seed0/sweep0_001"):
        assert checkpoints.load_meta(work / name)["resumed_from_step"] > 0, name

    assert report_numbers(work / "soups-seed0" / "report.json") == \
        report_numbers(tmp_path / "reference" / "soups-seed0" / "report.json")
    for ingredient in ("upstream/ingredient", "ingredients-seed0/sweep0_000", "ingredients-seed0/sweep0_001"):
        assert_bit_identical(checkpoints.load_variables(work / ingredient),
                             checkpoints.load_variables(tmp_path / "reference" / ingredient), ingredient)
