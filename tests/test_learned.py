"""Tests for soupjax.arithmetic.learned: the streamed gradient is the true gradient, and learning finds the best mix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soupjax.arithmetic import learned as learned_lib


class MLP(nn.Module):
    """A tiny MLP with a BatchNorm, so the mix covers 'params' and 'batch_stats'."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        return nn.Dense(3)(x)


MODEL = MLP()


def apply_mlp(variables, images):
    return MODEL.apply(variables, images)


def _ingredients(k=3, seed=0):
    """K variable trees for MLP, written with numpy (no eager flax init: it compiles every primitive)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        def normal(*shape):
            return rng.normal(size=shape).astype(np.float32)

        def positive(n):
            return rng.uniform(0.5, 1.5, n).astype(np.float32)

        out.append({
            "params": {
                "Dense_0": {"kernel": normal(5, 8), "bias": normal(8)},
                "BatchNorm_0": {"scale": positive(8), "bias": normal(8)},
                "Dense_1": {"kernel": normal(8, 3), "bias": normal(3)},
            },
            "batch_stats": {"BatchNorm_0": {"mean": normal(8), "var": positive(8)}},
        })
    # The trees must be what flax itself builds for MLP.
    want = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 5)))
    assert jax.tree.structure(want) == jax.tree.structure(out[0])
    return out


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    mask = np.ones(n, np.float32)
    mask[-3:] = 0.0  # padding must not count
    return {"image": rng.normal(size=(n, 5)).astype(np.float32), "label": rng.integers(0, 3, n), "mask": mask}


def _reference_loss(trees, mode):
    """The loss as a function of (logits, temperature) with all K ingredients held and differentiated
    through; the mixing weights are written out independently of learned.py."""
    leaves_k = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    treedef = jax.tree_util.tree_structure(trees[0])
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves_k[0]]
    param_names = [n for n in names if n.startswith("params/")]

    def weights_for(name, alpha):
        if mode == "global":
            return alpha
        if name.startswith("params/"):
            return alpha[param_names.index(name)]
        # batch_stats/BatchNorm_0/mean -> the mean weights of params/BatchNorm_0/{scale,bias}.
        module = name.split("/")[1]
        rows = [r for r, n in enumerate(param_names) if n.split("/")[1] == module]
        return jnp.mean(alpha[jnp.asarray(rows)], axis=0)

    def loss(logits, temperature, batch):
        alpha = jax.nn.softmax(logits, axis=-1)
        mixed = []
        for j, name in enumerate(names):
            w = weights_for(name, alpha)
            leaf = sum(w[i] * jnp.asarray(leaves_k[i][j][1], jnp.float32) for i in range(len(trees)))
            if not name.startswith("params/"):
                leaf = jax.lax.stop_gradient(leaf)  # statistics are mixed, not differentiated
            mixed.append(leaf)
        out = apply_mlp(jax.tree_util.tree_unflatten(treedef, mixed), batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(temperature * out, batch["label"])
        return jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"])

    return loss, len(param_names)


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_streamed_gradient_equals_jax_grad_through_the_mix(mode):
    trees = _ingredients()
    problem = learned_lib.MixingProblem(learned_lib.Ingredients([lambda t=t: t for t in trees]), apply_mlp, mode)
    ref_loss, n_params = _reference_loss(trees, mode)
    shape = (3,) if mode == "global" else (n_params, 3)
    logits = jax.random.normal(jax.random.key(7), shape)  # away from uniform, so the test is not symmetric
    temperature = jnp.float32(1.7)
    batch = _batch()

    loss, g_logits, g_t, (n, _) = problem.loss_and_grad(logits, temperature, batch)
    want_loss, (want_g_logits, want_g_t) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1)))(
        logits, temperature, batch
    )

    assert float(n) == 13.0
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_logits, want_g_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_t, want_g_t, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(g_logits)).max() > 1e-3  # a real gradient, not zeros on both sides


# -- a toy task with one clearly best ingredient ----------------------------------------------------

N_CLASSES, DIM = 4, 8


def apply_linear(variables, images):
    p = variables["params"]
    return images @ p["kernel"] + p["bias"]


def _toy(seed=0):
    rng = np.random.default_rng(seed)
    means = 3.0 * np.eye(N_CLASSES, DIM, dtype=np.float32)
    labels = rng.integers(0, N_CLASSES, 256)
    images = (means[labels] + 0.5 * rng.normal(size=(256, DIM))).astype(np.float32)
    batches = [
        {"image": images[i : i + 64], "label": labels[i : i + 64], "mask": np.ones(64, np.float32)}
        for i in range(0, 256, 64)
    ]
    best = {"params": {"kernel": means.T.copy(), "bias": np.zeros(N_CLASSES, np.float32)}}
    noisy = [
        {
            "params": {
                "kernel": (means.T + 4.0 * rng.normal(size=means.T.shape)).astype(np.float32),
                "bias": rng.normal(size=N_CLASSES).astype(np.float32),
            }
        }
        for _ in range(3)
    ]
    ingredients = noisy[:2] + [best] + noisy[2:]  # the best one is not first
    return ingredients, (lambda: iter(batches)), images, labels


def _accuracy(tree, images, labels):
    p = jax.tree.map(np.asarray, tree)["params"]  # numpy: no eager jax ops to compile
    return float(np.mean(np.argmax(images @ p["kernel"] + p["bias"], -1) == labels))


def test_learned_soup_weights_the_best_ingredient_most():
    ingredients, batches, images, labels = _toy()
    accs = [_accuracy(t, images, labels) for t in ingredients]
    best = int(np.argmax(accs))
    assert best == 2 and accs[best] > max(accs[:2] + accs[3:]) + 0.1

    seen = []
    loaders = [lambda t=t: t for t in ingredients]
    result = learned_lib.learned(loaders, apply_linear, batches, epochs=8, learning_rate=0.1, on_epoch=seen.append)
    assert int(np.argmax(result.weights)) == best
    np.testing.assert_allclose(np.sum(result.weights), 1.0, rtol=1e-6)
    assert result.heldout >= accs[best]
    assert _accuracy(result.variables, images, labels) == result.heldout
    assert [h["epoch"] for h in result.history] == list(range(9)) and seen == result.history
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # learning beats the uniform soup
    # The uniform soup starts confidently wrong, where a lower temperature lowers the held-out loss:
    # the temperature goes down (test_temperature_follows_the_loss_and_stays_positive checks a step).
    problem = learned_lib.MixingProblem(learned_lib.Ingredients(loaders), apply_linear)
    _, _, g_t, _ = problem.loss_and_grad(problem.init_logits(), jnp.float32(1.0), next(batches()))
    assert result.history[0]["loss"] > 3.0 and float(g_t) > 0
    assert 0.0 < result.temperature < 1.0

    layer = learned_lib.learned(loaders, apply_linear, batches, mode="layer", epochs=8, learning_rate=0.1)
    assert set(layer.weights) == {"params/kernel", "params/bias"}
    assert int(np.argmax(layer.weights["params/kernel"])) == best
    assert layer.heldout >= accs[best]


def test_streaming_from_loaders_matches_in_memory():
    ingredients, batches, _, _ = _toy()
    calls = [0]

    def make_loader(t):
        def load():
            calls[0] += 1
            return jax.tree.map(np.copy, t)  # a fresh tree, as a read from disk would give

        return load

    loaders = [make_loader(t) for t in ingredients]
    kwargs = dict(epochs=2, learning_rate=0.1, mode="layer")
    host = learned_lib.learned(loaders, apply_linear, batches, **kwargs)
    assert calls[0] == len(ingredients)  # loaded once, kept on the host
    calls[0] = 0
    streamed = learned_lib.learned(loaders, apply_linear, batches, memory_budget_bytes=1, **kwargs)
    assert calls[0] > 10 * len(ingredients)  # re-read every pass

    np.testing.assert_allclose(streamed.logits, host.logits, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(streamed.temperature, host.temperature, rtol=1e-6)
    assert [h["heldout_accuracy"] for h in streamed.history] == [h["heldout_accuracy"] for h in host.history]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), streamed.variables, host.variables
    )


def test_ingredients_budget_decides_host_or_streaming():
    trees = _ingredients(k=2)
    size = sum(x.nbytes for x in jax.tree.leaves(trees[0]))
    loaders = [lambda t=t: t for t in trees]
    assert learned_lib.Ingredients(loaders, None).on_host
    assert learned_lib.Ingredients(loaders, 2 * size).on_host
    assert not learned_lib.Ingredients(loaders, 2 * size - 1).on_host


def test_zero_epochs_is_the_uniform_soup_and_init_weights():
    from soupjax.arithmetic import soups

    trees = _ingredients(k=3)
    loaders = [lambda t=t: t for t in trees]
    result = learned_lib.learned(loaders, apply_mlp, lambda: [_batch()], epochs=0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), result.variables, soups.uniform(loaders)
    )
    np.testing.assert_allclose(result.weights, [1 / 3] * 3, rtol=1e-6)
    assert len(result.history) == 1 and result.temperature == 1.0

    problem = learned_lib.MixingProblem(learned_lib.Ingredients(loaders), apply_mlp, "layer")
    weights = problem.weights(problem.init_logits([1.0, 2.0, 1.0]))
    assert set(weights) == {"params/Dense_0/kernel", "params/Dense_0/bias", "params/BatchNorm_0/scale",
                            "params/BatchNorm_0/bias", "params/Dense_1/kernel", "params/Dense_1/bias"}
    for w in weights.values():
        np.testing.assert_allclose(w, [0.25, 0.5, 0.25], rtol=1e-6)


# -- precision: ingredients that differ by tiny displacements from a large shared init ---------------


def _near_identical(k=4, dim=256, classes=10, spread=1e-5, seed=0):
    """Ingredients that are nearly one model: |theta| ~ 10, theta_i - theta_j ~ ``spread`` (about ten
    float32 ulps of 10 at the default)."""
    rng = np.random.default_rng(seed)
    kernel0 = 10.0 + 0.1 * rng.normal(size=(dim, classes))
    bias0 = 10.0 + 0.1 * rng.normal(size=classes)
    trees = [
        {"params": {"kernel": (kernel0 + spread * rng.normal(size=kernel0.shape)).astype(np.float32),
                    "bias": (bias0 + spread * rng.normal(size=bias0.shape)).astype(np.float32)}}
        for _ in range(k)
    ]
    batch = {"image": rng.normal(size=(64, dim)).astype(np.float32), "label": rng.integers(0, classes, 64),
             "mask": np.ones(64, np.float32)}
    return trees, batch


def _float64_logit_grad(trees, batch, logits, temperature, mode):
    """dL/dlogits in float64 numpy: dz[., i] = alpha_i <dL/dtheta, theta_i - theta_mix>, per leaf in layer
    mode (rows in the order of learned.py's leaves: bias, kernel), for L the mean cross-entropy of the
    linear model at the exact mix."""
    names = ["bias", "kernel"]  # jax flattens dict keys sorted
    thetas = {n: np.stack([np.asarray(t["params"][n], np.float64) for t in trees]) for n in names}
    z = np.asarray(logits, np.float64)
    alpha = np.exp(z - z.max(-1, keepdims=True))
    alpha /= alpha.sum(-1, keepdims=True)
    rows = {n: (alpha if mode == "global" else alpha[r]) for r, n in enumerate(names)}
    mix = {n: np.tensordot(rows[n], thetas[n], axes=1) for n in names}
    x = np.asarray(batch["image"], np.float64)
    out = temperature * (x @ mix["kernel"] + mix["bias"])
    p = np.exp(out - out.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    d_out = temperature * (p - np.eye(p.shape[1])[batch["label"]]) / len(x)
    g = {"kernel": x.T @ d_out, "bias": d_out.sum(0)}
    per_leaf = {n: rows[n] * np.array([np.sum(g[n] * (thetas[n][i] - mix[n])) for i in range(len(trees))])
                for n in names}
    return per_leaf["bias"] + per_leaf["kernel"] if mode == "global" else np.stack([per_leaf[n] for n in names])


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_logit_gradient_is_accurate_for_near_identical_ingredients(mode):
    """<g, theta_i> - sum_j alpha_j <g, theta_j> cancels most float32 digits here (the old formula was
    7-17% off); alpha_i <g, theta_i - theta_mix> is within 1e-4 of float64."""
    trees, batch = _near_identical()
    problem = learned_lib.MixingProblem(learned_lib.Ingredients([lambda t=t: t for t in trees]), apply_linear, mode)
    shape = (4,) if mode == "global" else (2, 4)
    logits = jnp.asarray(0.5 * np.random.default_rng(3).normal(size=shape), jnp.float32)
    _, g_logits, _, _ = problem.loss_and_grad(logits, jnp.float32(1.3), batch)
    want = _float64_logit_grad(trees, batch, logits, 1.3, mode)
    assert np.abs(want).max() > 1e-6  # a real gradient to compare against
    error = np.linalg.norm(np.asarray(g_logits, np.float64) - want) / np.linalg.norm(want)
    assert error < 1e-3, error


def test_temperature_follows_the_loss_and_stays_positive():
    """Ingredients that are confidently wrong: the held-out loss keeps falling as the temperature goes
    down through 0 (a negative temperature flips the predictions), so an unconstrained temperature
    is driven negative. It must stay positive, and move the way the gradient says."""
    ingredients, batches, _, _ = _toy()
    wrong = [{"params": {"kernel": -3.0 * t["params"]["kernel"], "bias": t["params"]["bias"]}} for t in ingredients]
    loaders = [lambda t=t: t for t in wrong]
    problem = learned_lib.MixingProblem(learned_lib.Ingredients(loaders), apply_linear)
    first = next(batches())
    _, _, g_t, _ = problem.loss_and_grad(problem.init_logits(), jnp.float32(1.0), first)
    assert float(g_t) > 0  # lowering the temperature lowers the loss

    # One Adam step moves log(temperature) by -lr * sign(gradient) (the first step's size is lr).
    one = learned_lib.learned(loaders, apply_linear, lambda: [first], epochs=1, learning_rate=0.5)
    np.testing.assert_allclose(np.log(one.temperature), -0.5, rtol=1e-4)

    # Steps that would take a plain temperature from 1 to about 1 - 12 * 0.5 keep it positive.
    result = learned_lib.learned(loaders, apply_linear, batches, epochs=3, learning_rate=0.5)
    assert 0.0 < result.temperature < 0.1
    assert np.isfinite([h["loss"] for h in result.history]).all()
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# -- BatchNorm: mixing weights trained with the statistics recalibrated for the current soup --------


class TrainableMLP(nn.Module):
    """MLP with a BatchNorm that can run in training mode (the same tree as MLP), for recalibration."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(3)(x)


def test_learned_soup_trains_with_recalibrated_statistics():
    from soupjax.evaluation import batchnorm
    from soupjax.arithmetic import soups

    model = TrainableMLP()
    trees = _ingredients(k=3)
    loaders = [lambda t=t: t for t in trees]
    heldout = [_batch(seed=1)]
    calibration = [{"image": np.random.default_rng(s).normal(size=(32, 5)).astype(np.float32)} for s in range(2)]
    seen = []

    def recalibrate(variables):
        seen.append(variables)
        return batchnorm.recalibrate(model, variables, iter(calibration), num_batches=2)

    def loss_of(variables, batch, temperature=1.0):
        out = model.apply(variables, batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(temperature * out, batch["label"])
        return float(jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"]))

    result = learned_lib.learned(loaders, apply_mlp, lambda: iter(heldout), epochs=2, learning_rate=0.1,
                                 recalibrate=recalibrate)
    # Recalibrated for the initial soup and after each epoch; the soup's statistics are its own.
    assert len(seen) == 3
    uniform = recalibrate(soups.uniform(loaders))
    assert loss_of(uniform, heldout[0]) != pytest.approx(loss_of(soups.uniform(loaders), heldout[0]), rel=1e-2)
    assert result.history[0]["loss"] == pytest.approx(loss_of(uniform, heldout[0]), rel=1e-5)
    # Epoch 1's one step is taken at the uniform soup with those statistics: the same loss.
    assert result.history[1]["train_loss"] == pytest.approx(result.history[0]["loss"], rel=1e-5)
    want = recalibrate(learned_lib.MixingProblem(learned_lib.Ingredients(loaders), apply_mlp).mix(
        jnp.asarray(result.logits)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), result.variables, want)
    assert result.history[-1]["loss"] == pytest.approx(loss_of(want, heldout[0], result.temperature), rel=1e-5)
