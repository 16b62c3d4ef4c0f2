"""Fine-tuning: a real train step and a resume for every config, data parallelism, the CLI end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from soupjax import data
from soupjax.io import checkpoints
from soupjax.training import shared_init
from soupjax.training import planning, sweep
from soupjax.training import train
from soupjax.models import build_model_from_run_config as build_model
from soupjax.evaluation.evaluate import apply_for_eval

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["fashion_mnist_vit", "cifar10_vit_ti16", "cifar10_resnet50d", "imagenet_vit_b32"]


def load_config(name: str, arg: str = "testing"):
    spec = importlib.util.spec_from_file_location(f"configs.{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def init_variables(config, model=None):
    """The start of an ingredient of ``config`` as training makes it: model init, ``init_from``, head init."""
    return shared_init.with_head_init(config, shared_init.base_init(config, model), model)


def init_fingerprint(config, model=None) -> str:
    """The fingerprint ingredients of ``config`` record of their init (before the head init)."""
    from soupjax.importers.fingerprint import weights_fingerprint
    return weights_fingerprint(shared_init.base_init(config, model)["params"])


def forward_logits(config, variables_list, split: str, batch_size: int = 64):
    """Logits of a plain forward pass (no Evaluator, no cache) of each of ``variables_list`` over the real
    examples of ``split``, and their labels."""
    model = build_model(config)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits, labels = [[] for _ in variables_list], []
    for batch in data.eval_batches(config.data, split, batch_size):
        real = batch["mask"] > 0
        labels.append(batch["label"][real])
        for out, variables in zip(logits, variables_list):
            out.append(np.asarray(apply(variables, batch["image"]), np.float64)[real])
    return [np.concatenate(x) for x in logits], np.concatenate(labels)


def assert_accuracy(reported: float, logits: np.ndarray, labels: np.ndarray, what=""):
    """``reported`` is the accuracy of ``logits``, up to examples whose top two logits tie within float32
    rounding (relative to the logits' size: a briefly trained zero-init head gives logits of ~0.03)."""
    correct = int((logits.argmax(-1) == labels).sum())
    top2 = np.sort(logits, -1)[:, -2:]
    ties = int((top2[:, 1] - top2[:, 0] < 1e-5 * np.abs(top2).max(-1) + 1e-7).sum())
    assert abs(reported * len(labels) - correct) <= ties + 1e-6, (what, reported, correct / len(labels), ties)


def assert_metrics(metrics: dict, logits: np.ndarray, labels: np.ndarray, what=""):
    """An ingredient's stored metrics are the accuracy, mean cross-entropy and count of these logits."""
    assert metrics["num_examples"] == len(labels), what
    assert_accuracy(metrics["accuracy"], logits, labels, what)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-4, atol=1e-6, err_msg=str(what))


class Preempted(Exception):
    pass


def _interrupt_after(n: int, monkeypatch):
    """Make the input pipeline die after ``n`` batches, as a preempted VM would."""
    real = data.train_batches

    def dying(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == n:
                raise Preempted
            yield batch

    monkeypatch.setattr(data, "train_batches", dying)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_train_step_and_resume_under_mock_data(name, tmp_path, monkeypatch):
    """Each config trains, resumes bit-exactly after a preemption and, for the reference studies, goes on
    through cooking as experiments/*.sh run it (greedy; a ResNet also with recalibrated BatchNorm)."""
    config = load_config(name)
    config.total_steps = 4
    config.checkpoint_every_steps = 2  # the run preempted after 2 steps resumes from step 2's checkpoint
    config.head_init = "default"  # the linear probe has its own test; keep this one about resuming
    with tfds.testing.mock_data(num_examples=64):
        straight = train.train_and_evaluate(config, tmp_path / "straight", tmp_path / "ingredients" / "straight")
        with monkeypatch.context() as m:
            _interrupt_after(2, m)
            with pytest.raises(Preempted):
                train.train_and_evaluate(config, tmp_path / "resumed", tmp_path / "ingredients" / "resumed")
        assert not checkpoints.is_ingredient(tmp_path / "ingredients" / "resumed"), "a preempted run must not leave an ingredient"
        resumed = train.train_and_evaluate(config, tmp_path / "resumed", tmp_path / "ingredients" / "resumed")
    assert straight["resumed_from_step"] == 0
    assert resumed["resumed_from_step"] == 2
    assert resumed["steps"] == straight["steps"] == 4
    a = checkpoints.load_variables(tmp_path / "ingredients" / "straight")
    b = checkpoints.load_variables(tmp_path / "ingredients" / "resumed")
    init = init_variables(config)
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: np.abs(x - y).max(), a["params"], init["params"]))
    assert max(moved) > 0, "training did not change the parameters"
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    # The metrics stored with the ingredient are those of a plain forward pass of its variables.
    with tfds.testing.mock_data(num_examples=64):
        for split in ("heldout", "test"):
            (logits,), labels = forward_logits(config, [b], split)
            assert_metrics(resumed["metrics"][split], logits, labels, (name, split))
        if name != "fashion_mnist_vit":
            _cook_as_the_reference_study_does(name, tmp_path)
    if name == "cifar10_resnet50d":
        assert "batch_stats" in a
        before = jax.tree_util.tree_leaves(init["batch_stats"])
        after = jax.tree_util.tree_leaves(a["batch_stats"])
        assert any(not np.allclose(x, y) for x, y in zip(before, after)), "batch_stats were not updated"


def _cook_as_the_reference_study_does(name: str, root: Path) -> None:
    """The cooking stage of experiments/*.sh (study.stages.cook_into) on the two ingredients under root."""
    from soupjax.study import stages
    recalibrate = 2 if name == "cifar10_resnet50d" else 0
    results = stages.cook_into("greedy", root / "ingredients", root / "soups", False)
    assert {r["name"] for r in results["soups"]} == {"best_ingredient", "greedy"}, name
    assert checkpoints.is_ingredient(root / "soups" / "greedy")
    if recalibrate:
        stages.cook_into("greedy", root / "ingredients", root / "soups-recalibrated", False, recalibrate_bn=recalibrate)
        assert checkpoints.load_meta(root / "soups-recalibrated" / "greedy")["recalibrated_bn_batches"] == 2


def test_sweep_draws_are_reproducible_and_share_the_init():
    config = load_config("fashion_mnist_vit", "testing,sweep=4")
    runs = sweep.ingredient_configs(config)
    again = sweep.ingredient_configs(config)
    assert [r[2] for r in runs] == [r[2] for r in again]
    assert len({r[0] for r in runs}) == 4
    assert len({r[2]["learning_rate"] for r in runs}) == 4
    assert {r[1].init_seed for r in runs} == {config.init_seed}
    assert len({r[1].seed for r in runs}) == 4
    for _, run, hparams in runs:
        assert run.learning_rate == hparams["learning_rate"]
        assert run.data.aug_strength == hparams["data.aug_strength"]


def test_sweep_rejects_unknown_fields():
    config = load_config("fashion_mnist_vit", "testing")
    with pytest.raises(KeyError, match="not_a_field"):
        sweep.apply(config, {"not_a_field": 1.0})
    with pytest.raises(ValueError, match="unknown distribution"):
        sweep.draw({"learning_rate": ["gaussian", 0, 1]}, 0, 0)


def test_unknown_config_option_is_named():
    with pytest.raises(ValueError, match="sweeps"):
        load_config("fashion_mnist_vit", "testing,sweeps=3")


_LOSS_SCRIPT = r"""
import json, sys
import importlib.util
import jax, numpy as np, tensorflow_datasets as tfds
from soupjax import data
from soupjax.devices import sharding
from soupjax.models import build_model_from_run_config as build_model
from soupjax.training.shared_init import base_init, with_head_init
from soupjax.training.train_step import make_optimizer, make_train_step
spec = importlib.util.spec_from_file_location("cfg", sys.argv[1]); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m); config = m.get_config("testing")
config.batch_size = 16
model = build_model(config)
one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), (sharding.DATA_AXIS,),
                               axis_types=(jax.sharding.AxisType.Auto,))
losses = {}
with tfds.testing.mock_data(num_examples=64):
    init = with_head_init(config, base_init(config, model), model)
    config.label_smoothing = 0.1
    tx, hparams = make_optimizer(config, 3)
    for mesh in (one_device, sharding.data_mesh()):
        state = sharding.replicate({"step": np.zeros((), np.int32), "params": init["params"],
                                    "opt_state": tx.init(init["params"])}, mesh)
        step = make_train_step(model, tx, mesh)
        batches = data.train_batches(config.data, config.batch_size, seed=0)
        run = losses.setdefault(mesh.devices.size, [])
        for _ in range(3):
            state, metrics = step(state, sharding.shard_batch(next(batches), mesh), jax.random.PRNGKey(0), hparams)
            run.append(float(metrics["loss"]))
print(json.dumps({"devices": jax.device_count(), "losses": losses}))
"""


def test_the_training_pipeline_is_released_without_waiting_for_it(tmp_path, monkeypatch):
    """Deleting a long-lived tf.data iterator can block for up to a minute (its autotuning thread): the
    trainer leaves that to a daemon thread. Here the pipeline's release takes 2 s; training returns first."""
    import threading
    import time
    real = data.train_batches
    released, on_threads = [], []

    def slow_to_release(*args, **kwargs):
        try:
            yield from real(*args, **kwargs)
        finally:
            time.sleep(2.0)
            released.append(time.time())
            on_threads.append(threading.current_thread().name)

    monkeypatch.setattr(data, "train_batches", slow_to_release)
    with tfds.testing.mock_data(num_examples=64):
        train.train(load_config("fashion_mnist_vit", "testing"), tmp_path / "run")
    returned = time.time()
    deadline = returned + 30
    while not released and time.time() < deadline:
        time.sleep(0.05)
    assert released and released[0] > returned, "the caller waited for the pipeline's release"
    assert on_threads == ["release the training pipeline"]


@pytest.mark.slow
def test_four_devices_give_the_same_losses_as_one():
    # One process with 4 host devices trains on a mesh of its first device, then on the mesh of all four
    # (one start-up instead of one per device count: the suite's time on 2 cores).
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _LOSS_SCRIPT, str(ROOT / "configs" / "fashion_mnist_vit.py")],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and sorted(result["losses"]) == ["1", "4"]
    one, four = result["losses"]["1"], result["losses"]["4"]
    np.testing.assert_allclose(four, one, rtol=2e-5, atol=2e-5)
    assert one[0] != one[-1]


@pytest.mark.slow
def test_finetune_cli_writes_ingredients_that_load_back(finetuned_workdir):
    work = finetuned_workdir["workdir"]
    assert str(work) in finetuned_workdir["stdout"], "the default work directory is printed at start"
    found = checkpoints.list_ingredients(work / "ingredients")
    assert [p.name for p in found] == ["sweep0_000", "sweep0_001"]
    metas = [checkpoints.load_meta(p) for p in found]
    assert metas[0]["init_fingerprint"] == metas[1]["init_fingerprint"]
    assert metas[0]["hparams"]["learning_rate"] != metas[1]["hparams"]["learning_rate"]
    config = load_config("fashion_mnist_vit", "testing")
    expected = jax.eval_shape(lambda: init_variables(config))
    for p, meta in zip(found, metas):
        variables = checkpoints.load_variables(p)
        assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
        jax.tree_util.tree_map(lambda a, e: (a.shape, a.dtype) == (e.shape, e.dtype) or pytest.fail(str(a.shape)),
                               variables, expected)
        # The stored metrics are those of a plain forward pass on the real Fashion-MNIST splits.
        run_config = ml_collections.ConfigDict(meta["config"])
        for split, count in (("test", 1000), ("heldout", 16)):  # the testing variant's share of the test split
            (logits,), labels = forward_logits(run_config, [variables], split, batch_size=500)
            assert len(labels) == count
            assert_metrics(meta["metrics"][split], logits, labels, (p.name, split))
        assert meta["config"]["learning_rate"] == meta["hparams"]["learning_rate"]
        # The wall time is accounted for: setup, the training loop and the evaluation, in that order.
        parts = [meta["setup_seconds"], meta["train_seconds"], meta["evaluate_seconds"]]
        assert all(t > 0 for t in parts) and sum(parts) <= meta["wall_seconds"], (parts, meta["wall_seconds"])
    assert "setup " in finetuned_workdir["stdout"] and "evaluation " in finetuned_workdir["stdout"]
    # A rerun of the same command skips the finished ingredients.
    again = subprocess.run(finetuned_workdir["cmd"], env=finetuned_workdir["env"], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 2


@pytest.mark.slow
def test_finetune_cli_names_a_missing_pretrained_file(tmp_path, fashion_mnist_data_dir):
    cmd = [sys.executable, "-m", "soupjax.finetune", "--config",
           f"configs/fashion_mnist_vit.py:testing,init={tmp_path}/nope.npz",
           f"--config.data.data_dir={fashion_mnist_data_dir}", f"--workdir={tmp_path}/w"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "nope.npz" in out.stderr
    assert not (tmp_path / "w" / "ingredients" / "ingredient").exists()


@pytest.mark.slow
def test_linear_probe_fits_the_head_once_per_init(fashion_mnist_data_dir, monkeypatch):
    from soupjax.evaluation import evaluate
    config = load_config("fashion_mnist_vit", "testing")
    config.data.data_dir = fashion_mnist_data_dir
    config.data.heldout = 1000
    config.head_init = "linear_probe"
    config.linear_probe.num_examples = 1024
    config.linear_probe.steps = 200
    model = build_model(config)
    base = shared_init.base_init(config, model)
    reads = []
    real = data.eval_batches
    monkeypatch.setattr(data, "eval_batches", lambda cfg, split, bs: reads.append(split) or real(cfg, split, bs))
    probed = shared_init.with_head_init(config, base, model)

    # Only the head changes, and it classifies: random-init ViT features probed on real images are far
    # above the 10% of chance (and of the zero-mean default head).
    for name in base["params"]:
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, base["params"][name], probed["params"][name]))
        assert same == (name != "head"), name
    evaluator = evaluate.Evaluator(apply_for_eval(model))
    assert evaluator(probed, real(config.data, "heldout", 500)).accuracy > 0.4

    # A sweep's next ingredient (same init, same examples) reuses the fit without reading data again;
    # another init is fitted anew.
    assert reads == ["train"]
    again = shared_init.with_head_init(config, base, model)
    assert reads == ["train"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, again["params"]["head"], probed["params"]["head"])
    other = shared_init.base_init(_reseeded(config), model)
    shared_init.with_head_init(_reseeded(config), other, model)
    assert reads == ["train", "train"]


def _reseeded(config):
    c = config.copy_and_resolve_references()
    c.init_seed = config.init_seed + 1
    return c


def test_work_made_with_another_config_is_refused_with_the_fields_named(tmp_path, monkeypatch):
    config = load_config("fashion_mnist_vit", "testing")
    # An unfinished run's training state (config.json beside its checkpoints).
    train.check_same_config(tmp_path / "config.json", config, "the training state")
    train.check_same_config(tmp_path / "config.json", config, "the training state")  # same config: fine
    changed = config.copy_and_resolve_references()
    changed.learning_rate = 0.5
    with pytest.raises(ValueError, match=r"learning_rate: 0\.001 != 0\.5"):
        train.check_same_config(tmp_path / "config.json", changed, "the training state")

    # A finished ingredient: skipped when its config is the same but for where the data lives,
    # refused (never silently reused in a sweep) when anything else differs.
    stored = config.to_dict()
    monkeypatch.setattr(checkpoints, "is_ingredient", lambda path: True)
    monkeypatch.setattr(checkpoints, "load_meta", lambda path: {"config": stored})
    moved = config.copy_and_resolve_references()
    moved.data.data_dir = str(tmp_path / "elsewhere")
    assert planning.finetune_all([("sweep0_000", moved, {})], tmp_path) == [{"config": stored}]
    with pytest.raises(ValueError, match=r"sweep0_000.*learning_rate: 0\.001 != 0\.5"):
        planning.finetune_all([("sweep0_000", changed, {})], tmp_path)


def test_config_json_is_the_plain_form_of_the_config(tmp_path):
    # files.plain is the one conversion to JSON values: config.json read back equals the live config's
    # plain form, and arrays, numpy scalars and paths in results become JSON numbers and strings.
    from soupjax.io import files
    config = load_config("fashion_mnist_vit", "testing")
    config.model.stages = (1, 2)  # a tuple, which JSON reads back as a list
    train.check_same_config(tmp_path / "config.json", config, "the training state")
    assert json.loads((tmp_path / "config.json").read_text()) == files.plain(config)
    assert files.plain(config)["model"]["stages"] == [1, 2]
    assert files.plain({"a": (np.float32(0.5), np.arange(2)), "b": jax.numpy.ones(1), 3: tmp_path}) == {
        "a": [0.5, [0, 1]], "b": [1.0], "3": str(tmp_path)}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        files.json_text({"x": object()})
