"""BatchNorm recalibration: the statistics are the exact mean and variance of each BatchNorm's inputs over
all examples of the batches used, even when they are large."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soupjax.evaluation.batchnorm import recalibrate

CHANNELS, FEATURES = 3, 4


class TwoNorms(nn.Module):
    """Two BatchNorms whose inputs do not depend on any normalisation, so NumPy can compute them."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.BatchNorm(use_running_average=not train, name="bn_input")(x)  # over (N, H, W)
        y = nn.Dense(FEATURES, name="dense")(x.mean(axis=(1, 2)))
        b = nn.BatchNorm(use_running_average=not train, momentum=0.99, name="bn_dense")(y)  # over N
        return a.mean(axis=(1, 2)) @ jnp.ones((CHANNELS, FEATURES)) + b


MODEL = TwoNorms()


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "bn_input": {"scale": np.ones(CHANNELS, np.float32), "bias": np.zeros(CHANNELS, np.float32)},
        "dense": {"kernel": rng.normal(size=(CHANNELS, FEATURES)).astype(np.float32),
                  "bias": rng.normal(size=FEATURES).astype(np.float32)},
        "bn_dense": {"scale": np.ones(FEATURES, np.float32), "bias": np.zeros(FEATURES, np.float32)},
    }
    stats = {"bn_input": {"mean": np.zeros(CHANNELS, np.float32), "var": np.ones(CHANNELS, np.float32)},
             "bn_dense": {"mean": np.zeros(FEATURES, np.float32), "var": np.ones(FEATURES, np.float32)}}
    variables = {"params": params, "batch_stats": stats}
    want = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 4, 4, CHANNELS)))
    assert jax.tree.structure(want) == jax.tree.structure(variables)
    return variables


def _batches(mean: float, n_batches=4, n=16, seed=0):
    """Images around ``mean`` with std 1; each batch shifted a little, so batches differ in mean."""
    rng = np.random.default_rng(seed)
    channel = np.array([0.0, 3.0, -2.0])
    return [{"image": (mean + channel + 0.5 * b + rng.normal(size=(n, 4, 4, CHANNELS))).astype(np.float32),
             "label": np.zeros(n, np.int32), "mask": np.ones(n, np.float32)} for b in range(n_batches)]


def _reference(variables, batches):
    """Population mean and (biased) variance of each BatchNorm's input in float64 over all examples."""
    x = np.concatenate([np.asarray(b["image"], np.float64) for b in batches])
    p = variables["params"]["dense"]
    y = x.mean(axis=(1, 2)) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    return {"bn_input": (x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))), "bn_dense": (y.mean(0), y.var(0))}


@pytest.mark.parametrize("mean", [0.0, 1000.0])
def test_recalibrated_statistics_are_the_population_statistics(mean):
    variables = _variables()
    batches = _batches(mean)
    got = recalibrate(MODEL, variables, iter(batches), num_batches=len(batches))
    for name, (want_mean, want_var) in _reference(variables, batches).items():
        stats = got["batch_stats"][name]
        assert stats["mean"].dtype == np.float32
        # float32 keeps ~7 digits of 1000: the mean to 1e-4 of the std, the variance to 1e-4 relative.
        np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(stats["var"], want_var, rtol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, got["params"], variables["params"])  # parameters untouched


def test_num_batches_and_padded_batches():
    variables = _variables()
    batches = _batches(1000.0, n_batches=5)
    padded = dict(batches[1], mask=np.r_[np.ones(15), 0.0].astype(np.float32))
    stream = [batches[0], padded, batches[2], batches[3], batches[4]]
    got = recalibrate(MODEL, variables, iter(stream), num_batches=2)
    want_mean, want_var = _reference(variables, [batches[0], batches[2]])["bn_input"]  # padding skipped
    np.testing.assert_allclose(got["batch_stats"]["bn_input"]["mean"], want_mean, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got["batch_stats"]["bn_input"]["var"], want_var, rtol=1e-4)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(MODEL, variables, iter([padded]), num_batches=2)


# -- cooking with --recalibrate_bn: every held-out score that decides a soup is of recalibrated statistics --


@pytest.fixture(scope="module")
def resnet_ingredients(tmp_path_factory):
    """Three ResNet ingredients around one init (no training: the recipes only need their variables)."""
    import tensorflow_datasets as tfds

    from soupjax.io import checkpoints
    from soupjax.importers.fingerprint import weights_fingerprint
    from test_base_init import _config
    from test_train import init_variables

    root = tmp_path_factory.mktemp("bn_soup")
    config = _config("resnet-testing", 10)
    config.data.classes = None  # the data set's own 10 classes, as the mocked data has
    config.eval_batch_size = 16  # full batches of the 64 mocked examples: recalibration skips padded ones
    with tfds.testing.mock_data(num_examples=64):
        base = init_variables(config)
    fingerprint = weights_fingerprint(base["params"])
    rng = np.random.default_rng(0)
    for i in range(3):
        params = jax.tree.map(lambda x: (x + 0.05 * rng.normal(size=x.shape)).astype(x.dtype), base["params"])
        stats = jax.tree.map(lambda x: (x + rng.uniform(0.5, 2.0, size=x.shape)).astype(x.dtype), base["batch_stats"])
        checkpoints.save_ingredient(root / f"ing{i}", {"params": params, "batch_stats": stats},
                                    {"name": f"ing{i}", "config": config.to_dict(), "init_fingerprint": fingerprint})
    return root


def _params_key(variables) -> str:
    from soupjax.importers.fingerprint import weights_fingerprint
    return weights_fingerprint(variables["params"])


def test_greedy_scores_its_first_ingredient_with_recalibrated_statistics(resnet_ingredients, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from soupjax.io import checkpoints
    from soupjax import cooking
    from soupjax.cooking.evaluations import Evaluations

    scored = {}  # params fingerprint -> held-out accuracy, as cooking scores candidates
    real = Evaluations.heldout_accuracy

    def spy(self, variables):
        assert self.recalibrate_batches == 2
        scored[_params_key(variables)] = score = real(self, variables)  # prepare() recalibrates inside
        return score

    monkeypatch.setattr(Evaluations, "heldout_accuracy", spy)
    with tfds.testing.mock_data(num_examples=64):
        results = cooking.cook("greedy", resnet_ingredients, tmp_path / "g", shifts=[], recalibrate_bn=2)
    first = results["progressions"]["greedy"][0]
    first_key = _params_key(checkpoints.load_variables(resnet_ingredients / first["ingredient"]))
    # The score greedy starts from (what every candidate must match or beat) is the first ingredient's
    # with recalibrated statistics, like the candidates', not its own held-out accuracy.
    assert first_key in scored
    assert first["heldout"] == scored[first_key] == first["soup_heldout"]
    assert len(scored) == 3  # the first ingredient and two candidates


def test_learned_soups_train_with_recalibrated_statistics(resnet_ingredients, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from soupjax import cooking
    from soupjax.cooking.evaluations import Evaluations
    from soupjax.arithmetic import learned

    prepared = []
    real_prepare = Evaluations.prepare
    monkeypatch.setattr(Evaluations, "prepare",
                        lambda self, v: prepared.append(_params_key(v)) or real_prepare(self, v))
    hooks = []
    real_learned = learned.learned

    def spy(*args, **kwargs):
        hooks.append(kwargs.get("recalibrate"))
        return real_learned(*args, **kwargs)

    monkeypatch.setattr(learned, "learned", spy)
    with tfds.testing.mock_data(num_examples=64):
        results = cooking.cook("learned", resnet_ingredients, tmp_path / "l", shifts=[], recalibrate_bn=2,
                               learned_mode="global", learned_epochs=2)
    assert len(hooks) == 1 and hooks[0] is not None
    # The initial soup, the soup after each epoch, and the final soup before it is saved.
    assert len(prepared) == 2 + 2
    assert len(results["learned_history"]["learned_global"]) == 3
