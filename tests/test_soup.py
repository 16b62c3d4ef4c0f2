"""The soup CLI end to end, its pre-flight checks, inspection, and BatchNorm recalibration."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from soupjax.io import trees
from soupjax import report
from soupjax.evaluation import batchnorm
from soupjax.io import checkpoints
from soupjax import cooking as soup
from soupjax.cooking.evaluations import Evaluations
from soupjax.cooking import preflight
from soupjax.training import train
from soupjax.cli.errors import InputError
from test_train import assert_accuracy, forward_logits, init_variables, load_config

ROOT = Path(__file__).resolve().parents[1]

# The merge methods' grids cut to a point or two: their choices are tested in test_methods.py, here
# the soups and the report around them.
ONE_POINT_GRIDS = {"task_arithmetic_scales": "1", "ties_densities": "0.5", "ties_lambdas": "1",
                   "dare_drop_rates": "0.5", "dare_scales": "1", "slerp_ts": "0.5", "wise_ft_alphas": "0,1"}


def _make_ingredients(root: Path, name: str = "fashion_mnist_vit", count: int = 3, **overrides) -> Path:
    config = load_config(name, f"testing,sweep={count}")
    for key, value in overrides.items():
        config[key] = value
    from soupjax.training import sweep
    for run_name, run, hparams in sweep.ingredient_configs(config):
        train.train_and_evaluate(run, root / "train" / run_name, root / "ingredients" / run_name,
                                 extra_meta={"hparams": hparams})
    return root / "ingredients"


@pytest.fixture(scope="module")
def mocked_ingredients(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    with tfds.testing.mock_data(num_examples=64):
        return _make_ingredients(root)


def _fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _combination(trees, weights):
    return jax.tree_util.tree_map(lambda *xs: sum(w * np.asarray(x, np.float64) for w, x in zip(weights, xs)), *trees)


def _assert_trees_close(got, want, what):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what),
                           got, want)


@pytest.mark.slow
def test_every_recipe_cooks_and_each_soup_loads_back(mocked_ingredients, tmp_path):
    out = tmp_path / "soups"
    shift = "shift/gaussian_noise-3"
    with tfds.testing.mock_data(num_examples=64):
        results = soup.cook("all", mocked_ingredients, out, learned_epochs=2, shifts=[shift], **ONE_POINT_GRIDS)
    names = {row["name"] for row in results["soups"]}
    assert {"best_ingredient", "uniform", "greedy", "pruned", "learned_global", "learned_layer", "ensemble"} <= names
    ingredient_names = ["sweep0_000", "sweep0_001", "sweep0_002"]
    ingredient_dirs = checkpoints.list_ingredients(mocked_ingredients)
    assert [p.name for p in ingredient_dirs] == ingredient_names
    loaded = [checkpoints.load_variables(p) for p in ingredient_dirs]
    ingredient_metas = [checkpoints.load_meta(p) for p in ingredient_dirs]
    config = ml_collections.ConfigDict(ingredient_metas[0]["config"])
    # The best ingredient is the one with the best held-out accuracy from training time (never test).
    best = ingredient_names[int(np.argmax([m["metrics"]["heldout"]["accuracy"] for m in ingredient_metas]))]
    assert results["meta"]["best_ingredient"] == best
    assert json.loads((out / "report.json").read_text())["meta"]["best_ingredient"] == best
    structure = checkpoints.variables_structure(mocked_ingredients / "sweep0_000")
    models = {}  # the model each row's accuracies belong to: a soup's saved variables or the ingredients
    for row in results["soups"]:
        assert set(row["shifts"]) == {shift}
        if row["name"] == "best_ingredient":
            assert row["ingredient"] == best and row["path"] == str(mocked_ingredients / best)
            assert row["weights"] == [float(n == best) for n in ingredient_names]
        if row["kind"] == "soup":
            meta = checkpoints.load_meta(row["path"])
            assert meta["ingredients"] == ingredient_names
            weights = meta["weights"]
            assert row["weights"] == weights
            # Every recipe's weights are a convex combination: greedy and pruned (1/n on the ingredients
            # they kept) as much as uniform and the softmax of the learned soups.
            assert min(weights) >= 0 and abs(sum(weights) - 1.0) < 1e-5, (row["name"], weights)
            used = [n for n, w in zip(ingredient_names, weights) if w > 0]
            assert meta["used"] == used and row["n_ingredients"] == len(used)
            variables = checkpoints.load_variables(row["path"])
            assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(structure)
            if row["name"] == "learned_layer":
                # Per layer: each parameter is its own convex combination of the ingredients' parameters.
                layer_weights = meta["layer_weights"]
                flat = {trees.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(variables)}
                assert set(layer_weights) == set(flat)
                leaves = [{trees.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(t)} for t in loaded]
                for path, w in layer_weights.items():
                    assert abs(sum(w) - 1.0) < 1e-5, path
                    np.testing.assert_allclose(flat[path], sum(wk * leaf[path] for wk, leaf in zip(w, leaves)),
                                               rtol=1e-5, atol=1e-6, err_msg=path)
                np.testing.assert_allclose(weights, np.mean(list(layer_weights.values()), axis=0), rtol=1e-6)
            else:
                if row["name"] in ("uniform", "greedy", "pruned"):
                    np.testing.assert_allclose([w for w in weights if w > 0], 1.0 / len(used), rtol=1e-6)
                # The soup is exactly that weighted average of the ingredients.
                _assert_trees_close(variables, _combination(loaded, weights), row["name"])
            # A soup is an ingredient-format checkpoint: finetune's init_from accepts it.
            assert checkpoints.is_ingredient(row["path"])
            models[row["name"]] = [variables]
        elif row["kind"] == "merge":  # merges have their own tests (test_methods.py): here, their accuracies
            models[row["name"]] = [checkpoints.load_variables(row["path"])]
        elif row["kind"] == "ensemble":  # the logit ensemble, and the greedy ensemble of what it kept
            models[row["name"]] = [x for x, w in zip(loaded, row["weights"]) if w > 0]
        else:
            models[row["name"]] = [loaded[ingredient_names.index(best)]]
        if row["name"] != "best_ingredient":
            assert set(row["vs_best"]["test"]) >= {"diff", "p"}
    # Greedy kept what it added; pruned kept what it did not remove.
    greedy_used = checkpoints.load_meta(out / "greedy")["used"]
    added = [s["ingredient"] for s in results["progressions"]["greedy"] if s["action"] == "add"]
    assert sorted(added) == greedy_used and added[0] == best
    pruned_used = checkpoints.load_meta(out / "pruned")["used"]
    removed = {s["ingredient"] for s in results["progressions"]["pruned"] if s["action"] == "remove"}
    assert sorted(set(ingredient_names) - removed) == pruned_used
    # Learned soups: one history entry for the initial soup and one per epoch.
    for name in ("learned_global", "learned_layer"):
        assert [h["epoch"] for h in results["learned_history"][name]] == [0, 1, 2], name

    # Every reported accuracy is that of a plain forward pass of the saved model (the ensemble: of the
    # mean of the ingredients' logits) on the same examples.
    with tfds.testing.mock_data(num_examples=64):
        for split in ("heldout", "test", shift):
            every = [v for name in sorted(models) for v in models[name]]
            logits, labels = forward_logits(config, every, split)
            by_name, start = {}, 0
            for name in sorted(models):
                by_name[name] = np.mean(logits[start:start + len(models[name])], axis=0)
                start += len(models[name])
            for row in results["soups"]:
                reported = {"heldout": row["heldout"], "test": row["test"]["accuracy"], **row["shifts"]}[split]
                assert_accuracy(reported, by_name[row["name"]], labels, (row["name"], split))
            if split == "heldout":  # a learned soup's last epoch ends at the saved soup's held-out accuracy
                for name in ("learned_global", "learned_layer"):
                    assert_accuracy(results["learned_history"][name][-1]["heldout_accuracy"], by_name[name],
                                    labels, (name, "history"))
    # The report on disk is the one made from these results.
    assert (out / "report.md").read_text() == report.markdown_table(results)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(results))
    for f in ("scatter.png", "greedy.png"):
        assert (out / f).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), f

    # The uniform soup really is the mean of the ingredients.
    uniform = checkpoints.load_variables(out / "uniform")
    mean = jax.tree_util.tree_map(lambda *xs: np.mean(np.stack(xs), 0), *loaded)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), uniform, mean)

    # A second run reuses what was cooked (resume) and gives the same numbers.
    with tfds.testing.mock_data(num_examples=64):
        again = soup.cook("all", mocked_ingredients, out, learned_epochs=2, shifts=["shift/gaussian_noise-3"],
                          **ONE_POINT_GRIDS)
    assert [r["test"] for r in again["soups"]] == [r["test"] for r in results["soups"]]


@pytest.mark.slow
def test_greedy_and_pruned_never_read_the_test_split(mocked_ingredients, tmp_path, monkeypatch):
    seen = []
    real_batches = Evaluations.batches

    def spy(self, split):
        seen.append(split)
        return real_batches(self, split)

    candidate_reads = []
    real_heldout = Evaluations.heldout_accuracy

    def heldout_only(self, variables):
        before = len(seen)
        acc = real_heldout(self, variables)
        candidate_reads.append(seen[before:])
        return acc

    monkeypatch.setattr(Evaluations, "batches", spy)
    monkeypatch.setattr(Evaluations, "heldout_accuracy", heldout_only)
    with tfds.testing.mock_data(num_examples=64):
        soup.cook("greedy", mocked_ingredients, tmp_path / "g", shifts=[])
        soup.cook("pruned", mocked_ingredients, tmp_path / "p", shifts=[])
    assert len(candidate_reads) >= 2, "greedy/pruned did not evaluate candidates"
    assert all(reads == ["heldout"] for reads in candidate_reads), candidate_reads



@pytest.mark.slow
def test_cooking_reuses_training_time_logits_across_augmentation_sweeps(mocked_ingredients, tmp_path, monkeypatch):
    # The sweep draws data.aug_strength / mixup per ingredient; that changes training only, so each
    # ingredient's held-out and test logits from training time must serve cooking as they are.
    metas = [checkpoints.load_meta(p) for p in checkpoints.list_ingredients(mocked_ingredients)]
    assert len({json.dumps(m["config"]["data"], sort_keys=True) for m in metas}) > 1, "sweep did not vary data"
    seen = []
    real_batches = Evaluations.batches
    monkeypatch.setattr(Evaluations, "batches", lambda self, split: seen.append(split) or real_batches(self, split))
    with tfds.testing.mock_data(num_examples=64):
        soup.cook("uniform", mocked_ingredients, tmp_path / "u", shifts=[])
    assert seen == ["heldout", "test"], f"splits read (only the soup should be evaluated): {seen}"


@pytest.mark.slow
def test_bare_cli_finds_the_ingredients_of_a_bare_finetune(finetuned_workdir, fashion_mnist_data_dir, tmp_path):
    # A copy of the bare finetune's work directory: the shared one stays as it was made, for the other tests.
    work = tmp_path / "work"
    shutil.copytree(finetuned_workdir["workdir"], work)
    cooked = subprocess.run([sys.executable, "-m", "soupjax.soup", "--recipe", "uniform", "--shifts=",
                             f"--data_dir={fashion_mnist_data_dir}"],
                            env={**finetuned_workdir["env"], "SOUPJAX_WORKDIR": str(work)},
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert cooked.returncode == 0, cooked.stderr[-3000:]
    assert f"work directory {work}" in cooked.stdout
    assert "uniform" in cooked.stdout and "best_ingredient" in cooked.stdout
    assert checkpoints.is_ingredient(work / "soups" / "uniform")
    assert (work / "soups" / "report.md").exists()
    # The soup cooked from the default work directory is the mean of the two fine-tuned ingredients there.
    ingredients = [checkpoints.load_variables(p) for p in checkpoints.list_ingredients(work / "ingredients")]
    assert len(ingredients) == 2
    _assert_trees_close(checkpoints.load_variables(work / "soups" / "uniform"),
                        _combination(ingredients, [0.5, 0.5]), "uniform")


# A missing or empty ingredients directory and every other bad input of the soup command line:
# tests/test_bad_input_cooking.py.


# ------------------------------------------------------------------------------------------ pre-flight


def _write(root: Path, name: str, tree, fingerprint="f0") -> Path:
    return checkpoints.save_ingredient(root / name, tree, {"init_fingerprint": fingerprint,
                                                           "metrics": {"heldout": {"accuracy": 0.5}}})


def test_preflight_names_the_mismatching_parameter_and_both_shapes(tmp_path):
    _write(tmp_path, "a", {"params": {"dense": {"kernel": np.zeros((3, 4), np.float32)}}})
    _write(tmp_path, "b", {"params": {"dense": {"kernel": np.zeros((3, 5), np.float32)}}})
    with pytest.raises(preflight.PreflightError, match=r"params/dense/kernel.*\(3, 4\).*\(3, 5\)"):
        preflight.gather(tmp_path)


def test_preflight_names_a_missing_parameter(tmp_path):
    _write(tmp_path, "a", {"params": {"dense": {"kernel": np.zeros(3, np.float32), "bias": np.zeros(3, np.float32)}}})
    _write(tmp_path, "b", {"params": {"dense": {"kernel": np.zeros(3, np.float32)}}})
    with pytest.raises(preflight.PreflightError, match="params/dense/bias"):
        preflight.gather(tmp_path)


def test_preflight_refuses_mixed_inits_unless_allowed(tmp_path):
    tree = {"params": {"w": np.ones(3, np.float32)}}
    _write(tmp_path, "a", tree, "aaaa")
    _write(tmp_path, "b", tree, "bbbb")
    with pytest.raises(preflight.PreflightError, match="different inits.*--allow_mixed_init"):
        preflight.gather(tmp_path)
    with pytest.warns(UserWarning, match="different inits"):
        assert len(preflight.gather(tmp_path, allow_mixed_init=True)) == 2


def test_preflight_leaves_out_nan_ingredients_with_a_warning(tmp_path):
    _write(tmp_path, "good", {"params": {"w": np.ones(3, np.float32)}})
    _write(tmp_path, "bad", {"params": {"w": np.array([1.0, np.nan, 1.0], np.float32)}})
    with pytest.warns(UserWarning, match="bad.*NaN or Inf.*params/w"):
        kept = preflight.gather(tmp_path)
    assert [ing.name for ing in kept] == ["good"]


@pytest.mark.slow
def test_cli_refuses_mixed_inits_with_exit_code(tmp_path):
    tree = {"params": {"w": np.ones(3, np.float32)}}
    _write(tmp_path / "ing", "a", tree, "aaaa")
    _write(tmp_path / "ing", "b", tree, "bbbb")
    out = subprocess.run([sys.executable, "-m", "soupjax.soup", "--recipe", "uniform", f"--ingredients={tmp_path}/ing",
                          f"--out={tmp_path}/out"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2
    assert "different inits" in out.stderr
    assert not (tmp_path / "out" / "uniform").exists()


# ------------------------------------------------------------------------------------------- inspect


@pytest.mark.slow
def test_inspect_angles_distances_and_interpolation(mocked_ingredients, tmp_path):
    from soupjax.inspect_soup import displacement_geometry, inspect
    d = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    angles, l2 = displacement_geometry(d)  # rows: displacements from the init
    np.testing.assert_allclose(angles[0, 1], 90.0, atol=1e-6)
    np.testing.assert_allclose(angles[0, 2], 45.0, atol=1e-6)
    np.testing.assert_allclose(l2[0, 1], np.sqrt(5.0))
    with tfds.testing.mock_data(num_examples=64):
        result = inspect(mocked_ingredients, tmp_path, pairs=1, points=3)
    dirs = checkpoints.list_ingredients(mocked_ingredients)
    assert result["names"] == [p.name for p in dirs]
    metas = [checkpoints.load_meta(p) for p in dirs]
    config = ml_collections.ConfigDict(metas[0]["config"])
    loaded = [checkpoints.load_variables(p) for p in dirs]

    # The geometry recomputed in float64 from the checkpoints and the init rebuilt from the config.
    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree["params"])])

    with tfds.testing.mock_data(num_examples=64):
        theta0 = flat(init_variables(config))
    vectors = np.stack([flat(v) for v in loaded])
    deltas = vectors - theta0
    cos = (deltas @ deltas.T) / np.outer(np.linalg.norm(deltas, axis=1), np.linalg.norm(deltas, axis=1))
    want_angles = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    np.fill_diagonal(want_angles, 0.0)
    np.testing.assert_allclose(result["angles_deg"], want_angles, atol=0.05)
    want_l2 = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)
    np.testing.assert_allclose(result["l2"], want_l2, rtol=1e-3, atol=1e-6)

    # One line, between the two best ingredients by held-out accuracy; each point's accuracy is that of a
    # plain forward pass of the interpolated weights.
    line = result["interpolation"][0]
    heldout = {p.name: m["metrics"]["heldout"]["accuracy"] for p, m in zip(dirs, metas)}
    assert line["a"] != line["b"]
    assert sorted([heldout[line["a"]], heldout[line["b"]]]) == sorted(heldout.values())[-2:]
    assert line["alphas"] == [0.0, 0.5, 1.0]
    a, b = (loaded[result["names"].index(line[k])] for k in ("a", "b"))
    points = [jax.tree_util.tree_map(lambda x, y: (1 - t) * np.asarray(x) + t * np.asarray(y), a, b)
              for t in line["alphas"]]
    with tfds.testing.mock_data(num_examples=64):
        logits, labels = forward_logits(config, points, "heldout")
    for accuracy, point_logits in zip(line["heldout"], logits):
        assert_accuracy(accuracy, point_logits, labels, "interpolation")
    assert (tmp_path / "inspect.json").exists() and (tmp_path / "angles.png").exists()

    # Displacements are measured from the start the ingredients recorded: another head init is refused.
    other_head = tmp_path / "other_head"
    shutil.copytree(mocked_ingredients, other_head)
    for meta_file in other_head.glob("*/meta.json"):
        if meta_file.parent.name == "start":
            continue  # the start training wrote stays what it was: the ingredients now claim another one
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "start_fingerprint": "fedcba9876543210"}))
    with tfds.testing.mock_data(num_examples=64), pytest.raises(InputError, match="started from fedcba9876543210"):
        inspect(other_head, tmp_path / "refused", pairs=1, points=3)
    assert not (tmp_path / "refused" / "inspect.json").exists()

    # From-scratch runs (other inits, --allow_mixed_init) share no θ0: no angles, the same distances and lines.
    mixed = tmp_path / "mixed"
    shutil.copytree(mocked_ingredients, mixed)
    first_meta = sorted(m for m in mixed.glob("*/meta.json") if m.parent.name != "start")[0]
    first_meta.write_text(json.dumps({**json.loads(first_meta.read_text()), "init_fingerprint": "another init"}))
    with tfds.testing.mock_data(num_examples=64), pytest.warns(UserWarning, match="2 different inits"):
        apart = inspect(mixed, tmp_path / "mixed_out", pairs=1, points=3, allow_mixed_init=True)
    assert apart["angles_deg"] is None and "different inits" in apart["no_angles"]
    np.testing.assert_allclose(apart["l2"], want_l2, rtol=1e-3, atol=1e-6)
    assert apart["interpolation"] == result["interpolation"]
    assert "Not given: " in (tmp_path / "mixed_out" / "inspect.md").read_text()
    assert not (tmp_path / "mixed_out" / "angles.png").exists()


# ------------------------------------------------------------------------------------ BatchNorm repair


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2, name="head")(x)


def test_recalibration_lifts_a_collapsed_batchnorm_soup():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 512)
    # The class signal is a small offset on top of a large shared mean: wrong running statistics
    # (as an averaged soup has) push every example to one side of the decision boundary.
    x = (100.0 + np.where(labels[:, None] == 1, 1.0, -1.0) * np.array([[1.0, 0.5]])
         + rng.normal(0, 0.3, (512, 2))).astype(np.float32)
    model = _BNNet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["head"]["kernel"] = np.array([[-1.0, 1.0], [-0.5, 0.5]], np.float32)
    params["head"]["bias"] = np.zeros(2, np.float32)
    collapsed = {"params": params, "batch_stats": {"BatchNorm_0": {"mean": np.full(2, 80.0, np.float32),
                                                                   "var": np.full(2, 1.0, np.float32)}}}

    def accuracy(v):
        return float((np.asarray(model.apply(v, x)).argmax(-1) == labels).mean())

    assert accuracy(collapsed) < 0.6
    batches = [{"image": x[i:i + 64], "label": labels[i:i + 64], "mask": np.ones(64, np.float32)} for i in range(0, 512, 64)]
    repaired = batchnorm.recalibrate(model, collapsed, batches, num_batches=8)
    # The statistics of the activations (here the inputs of the BatchNorm) averaged over the 8 batches,
    # as PyTorch's cumulative moving average gives: the batch means' mean, the batch variances' mean.
    x64 = x.astype(np.float64).reshape(8, 64, 2)
    np.testing.assert_allclose(repaired["batch_stats"]["BatchNorm_0"]["mean"], x64.mean(1).mean(0), rtol=0, atol=1e-3)
    np.testing.assert_allclose(repaired["batch_stats"]["BatchNorm_0"]["var"], x64.var(1).mean(0), rtol=1e-2)
    assert accuracy(repaired) > 0.95
    jax.tree_util.tree_map(np.testing.assert_array_equal, repaired["params"], collapsed["params"])
