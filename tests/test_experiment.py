"""The main job (the quick study, end to end on the real data) and dry runs of the reference studies."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from soupjax import checkpoints, experiment

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_runs_end_to_end(tmp_path, fashion_mnist_data_dir):
    out = subprocess.run([sys.executable, "-m", "soupjax.experiment", "--quick", f"--workdir={tmp_path}",
                          f"--data_dir={fashion_mnist_data_dir}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("best_ingredient", "uniform", "greedy", "pruned", "learned_global", "learned_layer", "ensemble"):
        assert f"| {name} |" in out.stdout
    assert "p=" in out.stdout, "the table reports paired significance"
    upstream = checkpoints.load_meta(tmp_path / "upstream" / "ingredient")
    ingredients = checkpoints.list_ingredients(tmp_path / "ingredients-seed0")
    assert len(ingredients) == 6
    metas = [checkpoints.load_meta(p) for p in ingredients]
    assert {m["init_from"] for m in metas} == {str(tmp_path / "upstream" / "ingredient")}
    assert len({m["init_fingerprint"] for m in metas}) == 1
    assert upstream["config"]["data"]["classes"] == [0, 1, 2, 3, 4]
    assert metas[0]["config"]["data"]["classes"] == [5, 6, 7, 8, 9]
    assert all(m["metrics"]["test"]["num_examples"] == 5000 for m in metas), "the test split has 5,000 images"
    # The ingredients learned the new task (chance is 20%).
    assert np.mean([m["metrics"]["test"]["accuracy"] for m in metas]) > 0.4
    report = (tmp_path / "soups-seed0" / "report.md").read_text()
    assert "McNemar" in report
    # A rerun resumes: nothing is trained or cooked again.
    again = subprocess.run([sys.executable, "-m", "soupjax.experiment", "--quick", f"--workdir={tmp_path}",
                            f"--data_dir={fashion_mnist_data_dir}"], capture_output=True, text=True, cwd=ROOT,
                           timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "upstream: finished earlier" in again.stdout
    skipped = [line for line in again.stdout.splitlines() if line.startswith("[2/3 ingredient")]
    assert skipped and all(line.endswith("finished earlier, skipped") for line in skipped), skipped
    assert again.stdout.count("cooked earlier, reused") == 5


@pytest.mark.parametrize("config,recalibrate", [("cifar10_vit_ti16", 0), ("cifar10_resnet50d", 2),
                                                ("imagenet_vit_b32", 0)])
def test_reference_study_dry_run_under_mock_data(config, recalibrate, tmp_path):
    cfg = experiment.load_config(str(ROOT / "configs" / f"{config}.py") + ":testing")
    with tfds.testing.mock_data(num_examples=64):
        results = experiment.run_sweep_study(cfg, tmp_path, recipe="greedy", recalibrate_bn=recalibrate)
    assert len(checkpoints.list_ingredients(tmp_path / "ingredients")) == 2
    assert {r["name"] for r in results["plain"]["soups"]} == {"best_ingredient", "greedy"}
    assert checkpoints.is_ingredient(tmp_path / "soups" / "greedy")
    if recalibrate:
        assert checkpoints.load_meta(tmp_path / "soups-recalibrated" / "greedy")["recalibrated_bn_batches"] == 2


def test_reference_scripts_name_their_config():
    for script, config in [("cifar10_vit_ti16.sh", "configs/cifar10_vit_ti16.py"),
                           ("cifar10_resnet50d.sh", "configs/cifar10_resnet50d.py"),
                           ("imagenet_vit_b32.sh", "configs/imagenet_vit_b32.py")]:
        text = (ROOT / "experiments" / script).read_text()
        assert config in text and "soupjax.experiment" in text
        assert (ROOT / config).exists()
        usage = subprocess.run(["bash", str(ROOT / "experiments" / script)], capture_output=True, text=True)
        assert usage.returncode != 0 and "path of the" in usage.stderr
