"""The plateau rule and schedule: when a held-out curve has levelled off, the cool-down that follows,
and a resumed run that cools down at the same step."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from soupjax import data
from soupjax.training import train
from soupjax.training.plateau import PlateauRule
from soupjax.training.train_step import learning_rate_at, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def test_rule_fires_only_when_the_last_evaluations_gain_less_than_min_delta():
    rule = PlateauRule(min_delta=0.003, patience=1)
    assert not rule.levelled_off([0.80])                         # nothing to compare with yet
    assert not rule.levelled_off([0.80, 0.85])                   # +5 points
    assert rule.levelled_off([0.80, 0.85, 0.852])                # +0.2 points over the best before
    assert not rule.levelled_off([0.80, 0.85, 0.853])            # exactly +0.3 points is still rising
    assert rule.levelled_off([0.80, 0.86, 0.85])                 # fell
    patient = PlateauRule(min_delta=0.003, patience=2)
    assert not patient.levelled_off([0.80, 0.85, 0.851])         # once is not enough
    assert patient.levelled_off([0.80, 0.85, 0.851, 0.852])
    assert not patient.levelled_off([0.80, 0.85, 0.851, 0.86])   # the last one rose again
    with pytest.raises(ValueError, match="patience"):
        PlateauRule(patience=0)


def test_plateau_schedule_is_warmup_constant_then_linear_to_zero():
    c = _config()
    c.lr_schedule, c.warmup_steps, c.learning_rate = "plateau", 4, 1e-3
    _, hparams = make_optimizer(c, 100)
    hparams.update(decay_start=np.float32(30), decay_steps=np.float32(10))
    reference = optax.join_schedules([optax.linear_schedule(0.0, 1e-3, 4), optax.constant_schedule(1e-3),
                                      optax.linear_schedule(1e-3, 0.0, 10)], [4, 30])
    for step in range(0, 45):
        np.testing.assert_allclose(learning_rate_at(step, hparams), reference(step), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="lr_schedule"):
        c.lr_schedule = "step"
        make_optimizer(c, 100)


def _config():
    spec = importlib.util.spec_from_file_location("fmnist_cfg", ROOT / "configs" / "fashion_mnist_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("testing")


def _plateau_config():
    c = _config()
    c.lr_schedule = "plateau"
    c.total_steps = 40
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 1
    c.plateau.cooldown_steps = 4
    # A learning rate of 0 keeps the held-out accuracy exactly flat: the rule must fire at the
    # second evaluation (step 6), and the run end after the 4 cool-down steps.
    c.learning_rate = 0.0
    return c


def test_training_cools_down_where_the_heldout_curve_levels_off(tmp_path):
    config = _plateau_config()
    with tfds.testing.mock_data(num_examples=64):
        result = train.train(config, tmp_path / "run")
    assert result.decay_start == 6
    assert result.steps == 10
    assert [s for s, _ in result.heldout_curve] == [3, 6, 9]
    assert len({a for _, a in result.heldout_curve}) == 1
    decision = json.loads((tmp_path / "run" / "plateau.json").read_text())
    assert decision["decay_start"] == 6
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "heldout_accuracy" in l] == [3, 6, 9]


def test_a_run_that_keeps_improving_cools_down_over_its_last_steps(tmp_path, monkeypatch):
    config = _plateau_config()
    rising = iter(0.5 + 0.01 * k for k in range(20))  # +1 point per evaluation, never levelling off
    monkeypatch.setattr(train.HeldoutCurve, "evaluate",
                        lambda self, step, state: self.points.append((step, next(rising))))
    with tfds.testing.mock_data(num_examples=64):
        result = train.train(config, tmp_path / "run")
    assert result.decay_start is None
    assert result.steps == 40
    assert not (tmp_path / "run" / "plateau.json").exists()


def test_resumed_run_takes_the_same_decision(tmp_path, monkeypatch):
    config = _plateau_config()
    with tfds.testing.mock_data(num_examples=64):
        straight = train.train(config, tmp_path / "straight")
        real = data.train_batches

        class Preempted(Exception):
            pass

        def dying(*args, **kwargs):
            for i, batch in enumerate(real(*args, **kwargs)):
                if i == 8:  # after the decision at step 6, before the end at step 10
                    raise Preempted
                yield batch

        with monkeypatch.context() as m:
            m.setattr(data, "train_batches", dying)
            with pytest.raises(Preempted):
                train.train(config, tmp_path / "resumed")
        assert (tmp_path / "resumed" / "plateau.json").exists()
        resumed = train.train(config, tmp_path / "resumed")
    assert resumed.start_step == 8
    assert (resumed.steps, resumed.decay_start) == (straight.steps, straight.decay_start)
    assert resumed.heldout_curve == straight.heldout_curve


def test_plateau_schedule_without_evaluations_is_refused(tmp_path):
    config = _plateau_config()
    config.eval_every_steps = 0
    with tfds.testing.mock_data(num_examples=64):
        with pytest.raises(ValueError, match="eval_every_steps"):
            train.train(config, tmp_path / "run")


def test_the_progress_line_counts_to_the_cap_until_the_rule_fires(tmp_path, monkeypatch):
    """Until the rule fires, a plateau run's step count and ETA are its epoch cap, and its progress line
    says so; from then on they are the run's length."""
    seen = []

    class Recording(train.Progress):
        def __call__(self, n: int = 1, **extra) -> None:
            super().__call__(n, **extra)
            seen.append((self.done, self.total, self.total_is_cap, self.line()))

    monkeypatch.setattr(train, "Progress", Recording)
    with tfds.testing.mock_data(num_examples=64):
        train.train(_plateau_config(), tmp_path / "run")
    assert [s[:3] for s in seen[5:7]] == [(6, 40, True), (7, 10, False)]  # the rule fires at step 6
    assert "6/40 steps (cap)" in seen[5][3] and "eta <=" in seen[5][3]
    assert "(cap)" not in seen[6][3] and "eta <=" not in seen[6][3]
