"""The main job (what a finished study leaves, checked on tests/test_killed_runs.py's uninterrupted study on
the real data; README's ``--quick`` sizes) and the reference scripts as their users start them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soupjax.io import checkpoints

ROOT = Path(__file__).resolve().parents[1]


def check_finished_study(workdir: Path, stdout: str, *, ingredients: int, test_examples: int) -> None:
    """What a finished ``python -m soupjax.experiment`` leaves, whatever its size: the table with paired
    significance, the upstream and the ingredients fine-tuned from it on the other classes, every run's
    length set by the plateau rule (or its cap) on its held-out curve, the report and the learning curves.

    Run on the whole study (tiny model, real Fashion-MNIST, ``--quick`` and its 2-3 point grids) that
    tests/test_killed_runs.py runs uninterrupted as the reference of its killed one: one study process
    for both tests, in a suite that has 10 minutes on 2 cores. README's ``--quick`` sizes are checked
    by ``test_the_quick_studys_own_sizes_build`` below."""
    for name in ("best_ingredient", "uniform", "greedy", "pruned", "learned_global", "learned_layer", "ensemble"):
        assert f"| {name} |" in stdout
    assert "p=" in stdout, "the table reports paired significance"
    upstream = checkpoints.load_meta(workdir / "upstream" / "ingredient")
    found = checkpoints.list_ingredients(workdir / "ingredients-seed0")
    assert len(found) == ingredients
    metas = [checkpoints.load_meta(p) for p in found]
    assert {m["init_from"] for m in metas} == {str(workdir / "upstream" / "ingredient")}
    assert len({m["init_fingerprint"] for m in metas}) == 1
    assert upstream["config"]["data"]["classes"] == [0, 1, 2, 3, 4]
    assert metas[0]["config"]["data"]["classes"] == [5, 6, 7, 8, 9]
    # The test images of classes 5-9: 5,000 in the whole test split.
    assert all(m["metrics"]["test"]["num_examples"] == test_examples for m in metas), test_examples
    # The ingredients learned the new task (chance is 20%).
    assert np.mean([m["metrics"]["test"]["accuracy"] for m in metas]) > 0.4
    report = (workdir / "soups-seed0" / "report.md").read_text()
    assert "McNemar" in report
    # The regime: every run evaluates its held-out curve, and the plateau rule (or the cap) set its length.
    for meta in [upstream] + metas:
        assert meta["config"]["lr_schedule"] == "plateau"
        steps = [s for s, _ in meta["heldout_curve"]]
        every = meta["config"]["eval_every_steps"]
        assert steps == list(range(every, meta["steps"], every)), meta["name"]
        if meta["decay_start"] is not None:
            # The rule fired: the run ended one cool-down after it.
            assert meta["steps"] == meta["decay_start"] + meta["config"]["plateau"]["cooldown_steps"]
    assert (workdir / "learning-curves-seed0.png").stat().st_size > 0
    assert "levelled off" in (workdir / "learning-curves-seed0.md").read_text()


def test_the_quick_studys_own_sizes_build(tmp_path):
    """``python -m soupjax.experiment --quick`` with README's sizes: both stages' configs pass the study's
    checks, and each stage's model (its width, depth and patch size on 28x28 images) runs a forward pass
    to one logit per class of its stage. (The whole pipeline at a tiny size: check_finished_study.)"""
    import jax
    import jax.numpy as jnp
    from soupjax.models import build_model_from_run_config
    from soupjax.study import stages
    upstream, downstream = stages.study_configs(str(ROOT / "configs" / "fashion_mnist_vit.py"), tmp_path,
                                                quick=True, seed=0, count=6)
    assert downstream.sweep.count == 6 and list(downstream.data.shifts) == ["shift/gaussian_noise-2"]
    for config in (upstream, downstream):  # 5 classes each: 0-4 upstream, 5-9 downstream
        assert config.lr_schedule == "plateau" and config.model.name == "vit" and config.model.num_layers == 2
        model = build_model_from_run_config(config)
        images = jnp.zeros((2, 28, 28, 1), jnp.float32)
        variables = model.init(jax.random.PRNGKey(0), images, train=False)
        assert model.apply(variables, images, train=False).shape == (2, 5)


# Each reference config through training, resuming and the study's cooking stage under mock data:
# tests/test_train.py::test_train_step_and_resume_under_mock_data.


# A stand-in for `python` on the PATH of the reference scripts: for `python -m soupjax.experiment ARGS` it runs
# the real command line (absl's flag parser, soupjax.experiment.main, the config file with its options),
# and records what main would start the study with instead of fine-tuning for hours.
_FAKE_PYTHON = r"""
import json, os, sys
assert sys.argv[1:3] == ["-m", "soupjax.experiment"], sys.argv
from soupjax.study import stages

def record(config, workdir, **kwargs):
    with open(os.environ["SOUPJAX_TEST_RECORD"], "w") as f:
        json.dump({"config": config.to_dict(), "workdir": str(workdir), "kwargs": kwargs}, f)
    return {}

stages.run_sweep_study = record
sys.argv = ["soupjax.experiment", *sys.argv[3:]]
from soupjax import experiment
experiment.run()
"""


def python_stand_in(tmp_path: Path, program: str) -> str:
    """A ``python`` that runs ``program`` (Python source) with the real interpreter instead, in a folder
    under tmp_path: the PATH a reference script is started with so that its python commands reach it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "fake_python.py").write_text(program)
    python = bin_dir / "python"
    python.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "{bin_dir / "fake_python.py"}" "$@"\n')
    python.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _run_script(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=python_stand_in(tmp_path, _FAKE_PYTHON), JAX_PLATFORMS="cpu",
               SOUPJAX_TEST_RECORD=str(tmp_path / "record.json"), PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", str(ROOT / "experiments" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script,args,want", [
    ("cifar10_vit_ti16.sh", ["/w/Ti_16.npz", "/data", "/runs/ti"],
     {"model": "vit-ti/16", "data": "cifar10", "count": 6, "data_dir": "/data", "workdir": "/runs/ti",
      "recalibrate_bn": 0}),
    ("cifar10_vit_ti16.sh", ["/w/Ti_16.npz"],
     {"model": "vit-ti/16", "data": "cifar10", "count": 6, "data_dir": None,
      "workdir": str(ROOT / "runs" / "cifar10_vit_ti16"), "recalibrate_bn": 0}),
    ("cifar10_resnet50d.sh", ["/w/resnet50d.safetensors", "/data", "/runs/r50"],
     {"model": "resnet50d", "data": "cifar10", "count": 6, "data_dir": "/data", "workdir": "/runs/r50",
      "recalibrate_bn": 200}),
    ("imagenet_vit_b32.sh", ["/w/B_32.npz", "/data", "4", "/runs/b32"],
     {"model": "vit-b/32", "data": "imagenet2012", "count": 4, "data_dir": "/data", "workdir": "/runs/b32",
      "recalibrate_bn": 0}),
])
def test_reference_scripts_start_the_study_they_describe(script, args, want, tmp_path):
    """Each script's command is parsed by the real CLI: every flag and config option it passes is valid
    and lands in the config and work directory the study would run with."""
    out = _run_script(script, args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    config = record["config"]
    assert config["model"]["name"] == want["model"]
    assert config["data"]["name"] == want["data"]
    assert config["init_from"]["path"] == args[0]
    assert config["sweep"]["count"] == want["count"]
    assert config["data"]["data_dir"] == want["data_dir"]
    assert record["workdir"] == want["workdir"]
    assert record["kwargs"] == {"recalibrate_bn": want["recalibrate_bn"], "overwrite": False}


def test_reference_scripts_refuse_to_start_without_their_weights(tmp_path):
    for script in ("cifar10_vit_ti16.sh", "cifar10_resnet50d.sh", "imagenet_vit_b32.sh"):
        usage = _run_script(script, [], tmp_path)
        assert usage.returncode != 0 and "path of the" in usage.stderr, script
        assert not (tmp_path / "record.json").exists(), script


def test_regimes_are_config_options_of_the_study(tmp_path):
    """``--config configs/fashion_mnist_vit.py:regime=NAME`` (issue 20's arms): each arm changes what it
    names and nothing else; options the study sets itself, and unknown arms, are refused."""
    from soupjax.cli.errors import InputError
    from soupjax.config.base import differences
    from soupjax.study import stages

    def configs(regime: str | None):
        spec = "configs/fashion_mnist_vit.py" + (f":regime={regime}" if regime else "")
        return stages.study_configs(str(ROOT / spec), tmp_path, quick=False, seed=0, count=8)

    up, down = configs(None)
    assert configs("today")[1].to_dict() == down.to_dict()
    for regime, want in (("small_data", {"data.train_fraction", "num_epochs", "eval_every_steps",
                                          "plateau.cooldown_steps"}),
                         ("narrow_lr", {"sweep.space.learning_rate"}),
                         ("small_data+narrow_lr", {"data.train_fraction", "num_epochs", "eval_every_steps",
                                                   "plateau.cooldown_steps", "sweep.space.learning_rate"})):
        arm_up, arm_down = configs(regime)
        assert differences(up, arm_up) == [], regime  # the upstream model is today's
        assert {d.split(":", 1)[0] for d in differences(down, arm_down)} == want, regime
    # The stronger upstream model: its own rule, and ingredients fine-tuned from it as today's are.
    arm_up, arm_down = configs("strong_upstream")
    assert {d.split(":", 1)[0] for d in differences(up, arm_up)} == {"plateau.patience", "plateau.min_delta"}
    assert (arm_up.plateau.patience, arm_up.plateau.min_delta) == (4, 0.001)
    assert differences(down, arm_down) == []
    assert configs("narrow_lr")[1].sweep.space.learning_rate == ["log_uniform", 1e-4, 3e-4]
    assert configs("small_data")[1].data.train_fraction == 0.1
    for bad, message in (("regime=larger", "regime must be one of"), ("regime=today+narrow_lr", "regime must be"),
                         ("stage=upstream", "set by the study")):
        with pytest.raises(InputError, match=message):
            stages.study_configs(str(ROOT / f"configs/fashion_mnist_vit.py:{bad}"), tmp_path, quick=False, seed=0,
                                 count=8)


def test_the_regime_map_script_runs_every_arm_with_options_the_study_accepts(tmp_path):
    """experiments/regime_map.sh with a ``python`` that records its arguments: every arm's study is started
    (seed 0, and small_data's seeds 1 and 2), each with a --config the study accepts, held-out phase first."""
    from soupjax.study import stages
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", str(ROOT / "experiments" / "regime_map.sh"), str(tmp_path / "runs")],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHON=str(fake)), timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = log.read_text().splitlines()
    studies = [c.split() for c in calls if c.startswith("-m soupjax.experiment")]
    started = set()
    for argv in studies:
        spec = argv[argv.index("--config") + 1]
        workdir, seed = argv[argv.index("--workdir") + 1], int(argv[argv.index("--seed") + 1])
        stages.study_configs(str(ROOT / spec), tmp_path / "w", quick=False, seed=seed, count=8)  # accepted
        started.add((spec.split("regime=")[1], seed, "--ingredients_only" in argv))
        assert workdir.endswith("map-" + spec.split("regime=")[1])
    arms = {"today", "small_data", "narrow_lr", "strong_upstream"}
    assert {(arm, 0, True) for arm in arms} | {(arm, 0, False) for arm in arms} <= started
    assert {("small_data", s, phase) for s in (1, 2) for phase in (True, False)} <= started
    first_cook = calls.index(next(c for c in calls if c.startswith("-m soupjax.experiment") and "--ingredients_only" not in c))
    assert all("--ingredients_only" not in c for c in calls[first_cook:] if "map-today" in c or "map-narrow_lr" in c)
    assert sum("regime_figure.py" in c for c in calls) == 1 and "regime_figure.py" in calls[-1]
    assert (tmp_path / "runs" / "map-strong_upstream" / "upstream" / "ingredient").is_symlink()
