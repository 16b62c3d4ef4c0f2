"""The shared start θ0 as a file: training writes it once beside the ingredients (``<ingredients>/start``,
fingerprinted), cooking, inspect and the API read it, so that cooking needs neither ``init_from``'s file
nor the linear probe's training images; a damaged or other start is refused, naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from soupjax import api
from soupjax import data
from soupjax.cli.errors import InputError
from soupjax.importers.fingerprint import weights_fingerprint
from soupjax.io import checkpoints, trees
from soupjax.training import linear_probe, planning, shared_init, sweep
from test_train import load_config

def _metas(ingredients_dir: Path) -> list[dict]:
    return [checkpoints.load_meta(p) for p in checkpoints.list_ingredients(ingredients_dir)]


def _same_trees(a, b) -> None:
    flat_a, flat_b = trees.flatten(a), trees.flatten(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path in flat_a:
        x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), path


@pytest.mark.slow
def test_the_sweep_writes_its_start_once_beside_the_ingredients(finetuned_workdir):
    ingredients = finetuned_workdir["workdir"] / "ingredients"
    start = ingredients / "start"
    meta = checkpoints.load_meta(start)
    metas = _metas(ingredients)
    assert [m["name"] for m in metas] == ["sweep0_000", "sweep0_001"], "start/ is not listed as an ingredient"
    assert [ing.name for ing in api.load_ingredients(ingredients)] == ["sweep0_000", "sweep0_001"]
    assert meta["kind"] == checkpoints.START_KIND == "start"
    for m in metas:
        assert (meta["start_fingerprint"], meta["init_fingerprint"]) == (m["start_fingerprint"], m["init_fingerprint"])
    assert meta["config"]["model"] == metas[0]["config"]["model"] and meta["activation"] == metas[0]["activation"]
    variables = checkpoints.load_variables(start)
    assert weights_fingerprint(variables) == meta["start_fingerprint"]
    # The file is the start the config rebuilds, bit for bit.
    _same_trees(variables, shared_init.rebuild_start(ml_collections.ConfigDict(metas[0]["config"]), metas))
    # Written with the first ingredient and not again with the second (same fingerprint): older than
    # the first ingredient, which was written before the second one's training began.
    assert (start / "meta.json").stat().st_mtime_ns < (ingredients / "sweep0_000" / "meta.json").stat().st_mtime_ns
    assert shared_init.locate_start(ingredients, metas, None, None, Path("/nonexistent")) == (start, None)


@pytest.fixture(scope="module")
def probed_sweep(tmp_path_factory, finetuned_workdir, fashion_mnist_data_dir):
    """Two ingredients fine-tuned from an upstream ingredient (init_from, a file cooking must not need) with
    a linear-probe head (fitted on training images cooking must not need), and the start they wrote."""
    root = tmp_path_factory.mktemp("probed")
    upstream = shutil.copytree(finetuned_workdir["workdir"] / "ingredients" / "sweep0_000", root / "upstream")
    config = load_config("fashion_mnist_vit", f"testing,sweep=2,init={upstream}")
    config.head_init = "linear_probe"
    config.data.data_dir = fashion_mnist_data_dir
    planning.finetune_all(sweep.ingredient_configs(config), root / "work")
    return {"root": root, "upstream": upstream, "ingredients": root / "work" / "ingredients"}


def _without_training_inputs(monkeypatch, upstream: Path) -> Path:
    """Take away what cooking must not need: the upstream init file (moved away) and the means to fit the
    linear probe again (the probe, and the training part of the training split, refuse to run). The held-out
    split stays: it is carved from TFDS's train split files, and greedy and evaluation read it."""
    gone = upstream.with_name("upstream-moved-away")
    upstream.rename(gone)
    monkeypatch.setattr(linear_probe, "fit_head", _refuse("the linear probe"))
    monkeypatch.setattr(data, "train_batches", _refuse("the training batches"))
    real_eval_batches = data.eval_batches

    def eval_batches(cfg, split, *args, **kwargs):
        if split == "train":
            raise AssertionError("cooking read the training images")
        return real_eval_batches(cfg, split, *args, **kwargs)

    monkeypatch.setattr(data, "eval_batches", eval_batches)
    return gone


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"cooking ran {what}")
    return refuse


@pytest.mark.slow
def test_cooking_reads_the_start_without_the_init_file_or_the_probe(probed_sweep, tmp_path, monkeypatch):
    ingredients, upstream = probed_sweep["ingredients"], probed_sweep["upstream"]
    metas = _metas(ingredients)
    assert metas[0]["config"]["head_init"] == "linear_probe" and metas[0]["init_from"] == str(upstream)
    start = checkpoints.load_meta(ingredients / "start")
    assert start["start_fingerprint"] == metas[0]["start_fingerprint"] != start["init_fingerprint"]

    # The reference: a copy without start/, cooked as older ingredient directories are (θ0 rebuilt from
    # the config: init_from's file and the linear probe on the training images).
    rebuilt_dir = shutil.copytree(ingredients, tmp_path / "rebuilt", ignore=shutil.ignore_patterns("start"))
    rebuilt = api.cook("task_arithmetic", rebuilt_dir, tmp_path / "out-rebuilt", shifts=[],
                       task_arithmetic_scales="0.5,1")
    rebuilt_init = api.shared_init(api.load_ingredients(rebuilt_dir))
    rebuilt_merge = api.merge("task_arithmetic", api.load_ingredients(rebuilt_dir), lam=0.7)

    moved = _without_training_inputs(monkeypatch, upstream)
    try:
        with pytest.raises(InputError, match="could not be rebuilt"):
            shared_init.rebuild_start(ml_collections.ConfigDict(metas[0]["config"]), metas)
        cooked = api.cook("task_arithmetic", ingredients, tmp_path / "out", shifts=[], task_arithmetic_scales="0.5,1")
        _same_trees(api.shared_init(api.load_ingredients(ingredients)), rebuilt_init)
        _same_trees(api.merge("task_arithmetic", api.load_ingredients(ingredients), lam=0.7), rebuilt_merge)
    finally:
        moved.rename(upstream)
    rows = {row["name"]: row for row in cooked["soups"]}
    assert "task_arithmetic" in rows
    for name, row in {row["name"]: row for row in rebuilt["soups"]}.items():
        assert (rows[name]["heldout"], rows[name]["test"]) == (row["heldout"], row["test"]), name
    _same_trees(checkpoints.load_variables(tmp_path / "out" / "task_arithmetic"),
                checkpoints.load_variables(tmp_path / "out-rebuilt" / "task_arithmetic"))


def _damage_values(start: Path) -> None:
    """A start whose meta.json is intact but one of whose values changed (silent corruption)."""
    variables, meta = checkpoints.load_variables(start), checkpoints.load_meta(start)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    leaf = jax.tree_util.tree_leaves(variables)[0]
    leaf.reshape(-1)[0] += 1.0
    checkpoints.save_ingredient(start, variables, meta)


def _other_fingerprint(start: Path) -> None:
    meta = json.loads((start / "meta.json").read_text())
    (start / "meta.json").write_text(json.dumps({**meta, "start_fingerprint": "fedcba9876543210"}))


def _truncate_a_file(start: Path) -> None:
    biggest = max((p for p in (start / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage, expected", [(_damage_values, "is damaged"),
                                              (_other_fingerprint, "has start_fingerprint fedcba9876543210"),
                                              (_truncate_a_file, "cannot be read")])
def test_a_damaged_or_other_start_is_refused_naming_it(probed_sweep, tmp_path, damage, expected):
    ingredients = shutil.copytree(probed_sweep["ingredients"], tmp_path / "ingredients")
    damage(ingredients / "start")
    metas = _metas(ingredients)
    where, problem = shared_init.locate_start(ingredients, metas, ml_collections.ConfigDict(metas[0]["config"]),
                                              None, tmp_path / "cache")
    assert where is None and expected in problem and str(ingredients / "start") in problem, problem
    assert "\n" not in problem and not (tmp_path / "cache").exists(), "refused, not rebuilt"
    with pytest.raises(InputError, match=expected) as refused:
        api.shared_init(api.load_ingredients(ingredients))
    assert str(ingredients / "start") in str(refused.value)
    with pytest.raises(InputError, match=expected):
        api.cook("task_arithmetic", ingredients, tmp_path / "out", shifts=[], task_arithmetic_scales="1")


def test_save_start_writes_only_a_new_start(tmp_path):
    config = load_config("fashion_mnist_vit")
    first = {"params": {"w": np.arange(3, dtype=np.float32)}}
    second = {"params": {"w": np.arange(3, dtype=np.float32) + 1}}
    kwargs = {"config": config, "init_fingerprint": "i"}
    assert shared_init.save_start(tmp_path / "start", first, start_fingerprint="a", **kwargs)
    assert not shared_init.save_start(tmp_path / "start", second, start_fingerprint="a", **kwargs)
    np.testing.assert_array_equal(checkpoints.load_variables(tmp_path / "start")["params"]["w"], first["params"]["w"])
    assert shared_init.save_start(tmp_path / "start", second, start_fingerprint="b", **kwargs)
    np.testing.assert_array_equal(checkpoints.load_variables(tmp_path / "start")["params"]["w"], second["params"]["w"])
    assert checkpoints.list_ingredients(tmp_path) == [] and checkpoints.is_start(tmp_path / "start")


def test_a_start_written_by_another_machine_meanwhile_is_taken(tmp_path, monkeypatch):
    """Machines splitting one sweep (--only) may write start/ at the same moment: the one whose save fails
    because the other's landed first takes that start, the same one; any other failure still raises."""
    config = load_config("fashion_mnist_vit")
    variables = {"params": {"w": np.arange(3, dtype=np.float32)}}
    kwargs = {"config": config, "init_fingerprint": "i"}
    real_save = checkpoints.save_ingredient

    def raced(directory, tree, meta, **kw):
        real_save(directory, tree, meta, **kw)  # the other machine's save lands first ...
        raise OSError(39, "Directory not empty")  # ... and this one's rename fails on it

    monkeypatch.setattr(checkpoints, "save_ingredient", raced)
    assert shared_init.save_start(tmp_path / "start", variables, start_fingerprint="a", **kwargs) is False
    assert checkpoints.load_meta(tmp_path / "start")["start_fingerprint"] == "a"

    def failing(directory, tree, meta, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_ingredient", failing)
    with pytest.raises(OSError, match="No space"):
        shared_init.save_start(tmp_path / "other", variables, start_fingerprint="a", **kwargs)


def test_an_ingredient_may_not_be_named_start(tmp_path):
    config = load_config("fashion_mnist_vit")
    with pytest.raises(InputError, match="may not be named 'start'"):
        planning.plan_runs([("start", config, {})], tmp_path / "ingredients", tmp_path / "train")
