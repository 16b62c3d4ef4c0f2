"""The learned soup (Wortsman et al. 2022, appendix "learned soup"; official ``learned_bylayer.py``).

Instead of choosing ingredients, learn the mixing weights on the held-out split:
``alpha = softmax(mixing logits)`` over the K ingredients (``mode='global'``: K logits; ``mode='layer'``:
K logits per parameter tensor), ``theta = sum_i alpha_i * theta_i``, and minimise the cross-entropy of
``temperature * f(x; theta)`` with a learned scalar temperature (init 1), trained with optax Adam.
The temperature is learned as its logarithm, ``temperature = exp(log_temperature)``: a plain scalar
is driven through 0 to negative values whenever the soup is confidently wrong on the held-out split
(a negative temperature flips the predictions and lowers the loss), after which the loss means
nothing. In log space an Adam step multiplies the temperature by about ``exp(+-lr)``.

Memory. Differentiating through the mix with ``jax.grad`` would keep all K ingredients on the
accelerator. Here they never are: the loss depends on the logits only through ``theta``, so

    dL/dalpha_i = <grad_theta L(theta), theta_i>        (per parameter tensor in layer mode)

and the chain rule through the softmax gives dL/dlogits,
``dL/dz_i = alpha_i (<g, theta_i> - sum_j alpha_j <g, theta_j>) = alpha_i <g, theta_i - theta>``. The
last form is the one computed: ingredients fine-tuned from one init agree in most of their digits,
and the first form subtracts two float32 inner products that do too (7-17% error on the
near-identical ingredients of tests/test_learned.py; see ``_inner``). One Adam step is therefore

  1. mix:   stream the K ingredients into a float32 running sum ``theta = sum_i alpha_i theta_i``;
  2. grad:  one jitted ``value_and_grad`` of the loss at ``theta`` w.r.t. ``theta`` and the temperature;
  3. inner: stream the K ingredients again for the inner products ``<grad, theta_i - theta>``;
  4. softmax chain rule (a tiny VJP) and the Adam update of (logits, log temperature).

Cost: two passes over the ingredients per step. The accelerator holds the mixed model, its gradient and
one ingredient at a time (~3 models, whatever K). The ingredients live either as numpy copies on the
host (K models of host memory, one host-to-device copy per ingredient per pass) when
``K * size <= memory_budget_bytes`` or the budget is None, or are re-read through their loaders each pass
(2K loader calls, i.e. disk reads, per step) when they do not fit.

BatchNorm statistics and any other non-``params`` collection are mixed with the same weights but not
differentiated (they are statistics of the data, not trained parameters); in layer mode a statistics
tensor takes the mean weights of the parameter tensors of the module that owns it (e.g. a BatchNorm's
``scale`` and ``bias``), or of all parameter tensors when that module has none. Mixed statistics do
not describe the mixed weights (a uniform soup of BatchNorm ResNets can sit at chance with them), so
``learned(recalibrate=...)`` replaces them by the soup's own: recomputed for the current mix before
the first epoch and after every epoch, and held fixed (not differentiated) during an epoch's steps.

Steps: one Adam step per held-out batch (as the official PyTorch code does, with lr 0.05 and 5 epochs
as its recommended defaults), not one step per epoch with accumulated gradients: the held-out split is
small (the paper's is 2% of ImageNet) and a handful of full-batch steps would barely move the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soupjax.arithmetic.soups import Loader, Variables
from soupjax.io.trees import Layout, cast_leaves

__all__ = ["Ingredients", "MixingProblem", "LearnedResult", "learned"]

ApplyFn = Callable[[Variables, jax.Array], jax.Array]
Batch = Mapping[str, Any]
Batches = Callable[[], Iterable[Batch]]


class Ingredients:
    """The K ingredients as the learned soup streams them: host numpy copies, or the loaders themselves.

    Args:
      loaders: one zero-argument callable per ingredient.
      memory_budget_bytes: host bytes the K ingredients may take. None keeps them on the host always;
        if ``K * size`` of one ingredient exceeds the budget, every pass re-calls the loaders.
    """

    def __init__(self, loaders: Sequence[Loader], memory_budget_bytes: int | None = None) -> None:
        if len(loaders) < 1:
            raise ValueError("a learned soup needs at least one ingredient")
        self._loaders = list(loaders)
        first = self._loaders[0]()
        self.layout, leaves = Layout.of(first)
        self.size_bytes = self.layout.nbytes
        self.on_host = memory_budget_bytes is None or len(loaders) * self.size_bytes <= memory_budget_bytes
        self._host: list[list[np.ndarray]] | None = None
        if self.on_host:
            # One load per ingredient, ever; np.asarray copies device arrays to host memory.
            host = [[np.asarray(x) for x in leaves]]
            del first, leaves
            for i in range(1, len(loaders)):
                tree = self._loaders[i]()
                host.append([np.asarray(x) for x in self.layout.leaves(tree, f"ingredient {i}")])
                del tree
            self._host = host

    def __len__(self) -> int:
        return len(self._loaders)

    def leaves(self, i: int) -> list[Any]:
        """The flat leaves of ingredient ``i`` (host copy, or freshly loaded)."""
        if self._host is not None:
            return self._host[i]
        return self.layout.leaves(self._loaders[i](), f"ingredient {i}")


@dataclasses.dataclass
class LearnedResult:
    """What ``learned`` returns.

    Attributes:
      variables: the learned soup, each leaf in its stored dtype.
      weights: global mode: a (K,) array of mixing weights; layer mode: a dict from parameter path
        (e.g. ``params/Dense_0/kernel``) to its (K,) weights.
      temperature: the learned temperature, always > 0 (affects the loss only; the soup has none).
      history: one dict per epoch (epoch 0 is the initial soup): ``epoch``, ``loss`` and
        ``heldout_accuracy`` of the soup at the end of that epoch on the held-out batches, and
        ``train_loss``, the mean loss over that epoch's steps (None for epoch 0).
      heldout: held-out accuracy of the final soup.
      logits: the final mixing logits ((K,) or (tensors, K)).
    """

    variables: Variables
    weights: np.ndarray | dict[str, np.ndarray]
    temperature: float
    history: list[dict[str, Any]]
    heldout: float = float("nan")
    logits: np.ndarray | None = None


def _module_of(path: str) -> str:
    """'params/Block_0/BatchNorm_0/scale' -> 'Block_0/BatchNorm_0' (collection and leaf name dropped)."""
    parts = path.split("/")
    return "/".join(parts[1:-1])


class _Spec(NamedTuple):
    """The static, hashable description of the variables tree: the jitted kernels below are
    module-level functions keyed on it, so a second learned soup over the same architecture (e.g.
    global, then layer) reuses their compilations."""

    treedef: Any
    diff_idx: tuple[int, ...]  # leaves that are differentiated (the 'params' collection)
    other_idx: tuple[int, ...]  # leaves that are only mixed (batch_stats, ...)

    @property
    def n_leaves(self) -> int:
        return len(self.diff_idx) + len(self.other_idx)


def _alphas(spec: _Spec, mode: str, owner: jax.Array, logits: jax.Array) -> jax.Array:
    """The (leaves, K) mixing weight of every leaf of the variables tree (differentiable in logits)."""
    k = logits.shape[-1]
    if mode == "global":
        return jnp.broadcast_to(jax.nn.softmax(logits)[None, :], (spec.n_leaves, k))
    p = jax.nn.softmax(logits, axis=-1)  # (differentiated leaves, K)
    a = jnp.zeros((spec.n_leaves, k), jnp.float32)
    a = a.at[jnp.asarray(spec.diff_idx, jnp.int32)].set(p)
    if spec.other_idx:
        # Each statistics leaf: the mean rows of its module's parameters. A weighted sum, not a
        # matmul, so no TF32 rounding on GPUs.
        others = jnp.sum(owner[:, :, None] * p[None, :, :], axis=1)
        a = a.at[jnp.asarray(spec.other_idx, jnp.int32)].set(others)
    return a


_alphas_jit = jax.jit(_alphas, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logit_grad(spec, mode, owner, logits, g_alpha_columns):
    # dL/dalpha[leaf, i] = <dL/dtheta_leaf, theta_i,leaf>; non-differentiated rows get 0.
    g_alpha = jnp.stack(g_alpha_columns, axis=1)
    d_alphas = jnp.zeros((spec.n_leaves, logits.shape[-1]), jnp.float32)
    d_alphas = d_alphas.at[jnp.asarray(spec.diff_idx, jnp.int32)].set(g_alpha)
    _, vjp = jax.vjp(lambda z: _alphas(spec, mode, owner, z), logits)  # chain rule through the softmax
    return vjp(d_alphas)[0]


@jax.jit
def _mix_first(leaves, a):
    return [a[j] * jnp.asarray(x).astype(jnp.float32) for j, x in enumerate(leaves)]


def _mix_add(acc, leaves, a):
    return [s + a[j] * jnp.asarray(x).astype(jnp.float32) for j, (s, x) in enumerate(zip(acc, leaves))]


_mix_add_donated = jax.jit(_mix_add, donate_argnums=0)  # the running sum is updated in place


@functools.partial(jax.jit, static_argnums=0)
def _inner(diff_idx, grads, mixed, leaves):
    # <g, theta_i - theta_mix>, not <g, theta_i>: ingredients fine-tuned from one init are nearly equal,
    # and the softmax chain rule would subtract sum_j alpha_j <g, theta_j> from <g, theta_i>, two large
    # float32 numbers that agree in most of their digits. theta_i - theta_mix is exact in float32
    # wherever the two are within a factor 2 (Sterbenz), i.e. wherever cancellation would bite, so the
    # small displacement keeps its digits; the rounding of theta_mix adds the same <g, delta> to every
    # i, which the chain rule's centring removes. Elementwise product and sum, not a dot: no
    # reduced-precision matmul on accelerators.
    return jnp.stack([jnp.sum(g * (jnp.asarray(leaves[j]).astype(jnp.float32) - m))
                      for g, m, j in zip(grads, mixed, diff_idx)])


def _batch_loss(apply_fn, spec, diff, other, temperature, batch):
    leaves = [None] * spec.n_leaves
    for j, x in zip(spec.diff_idx, diff):
        leaves[j] = x
    for j, x in zip(spec.other_idx, other):
        leaves[j] = x
    variables = jax.tree_util.tree_unflatten(spec.treedef, leaves)
    logits = apply_fn(variables, batch["image"]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(temperature * logits, batch["label"])
    mask = batch["mask"].astype(jnp.float32)
    n = jnp.sum(mask)
    loss = jnp.sum(ce * mask) / jnp.maximum(n, 1.0)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["label"]) * mask)
    return loss, (n, correct)


_batch_loss_jit = jax.jit(_batch_loss, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _grad_step(apply_fn, spec, diff, other, temperature, batch):
    """The one differentiation: the loss at the mixed params w.r.t. those params and the temperature."""
    (loss, aux), (g_diff, g_t) = jax.value_and_grad(_batch_loss, argnums=(2, 4), has_aux=True)(
        apply_fn, spec, diff, other, temperature, batch
    )
    return loss, aux, g_diff, g_t


class MixingProblem:
    """The pieces of one learned soup: mixing weights, streamed mixing and the streamed gradient.

    Kept public so that the gradient can be checked against ``jax.grad`` through the whole mix, and so
    that a caller can mix with given logits (``mix``) without training.
    """

    def __init__(self, ingredients: Ingredients, apply_fn: ApplyFn, mode: str = "global") -> None:
        if mode not in ("global", "layer"):
            raise ValueError(f"mode must be 'global' or 'layer', got {mode!r}")
        self.ingredients = ingredients
        self.mode = mode
        self.k = len(ingredients)
        layout = ingredients.layout
        paths = layout.paths
        # Differentiated leaves: the 'params' collection, or every leaf of a bare params tree.
        has_params = any(p.startswith("params/") for p in paths)
        diff_idx = tuple(j for j, p in enumerate(paths) if p.startswith("params/") or not has_params)
        other_idx = tuple(j for j in range(len(paths)) if j not in set(diff_idx))
        if not diff_idx:
            raise ValueError("the ingredients have no parameters to mix")
        self.spec = _Spec(layout.treedef, diff_idx, other_idx)
        self.diff_paths = [paths[j] for j in diff_idx]
        # Layer mode: each non-differentiated leaf averages the weight rows of its module's parameters
        # (a BatchNorm's statistics follow its scale and bias), or of all of them if it has none.
        owner = np.zeros((len(other_idx), len(diff_idx)), np.float32)
        diff_modules = [_module_of(p) for p in self.diff_paths]
        for o, j in enumerate(other_idx):
            rows = [r for r, m in enumerate(diff_modules) if m == _module_of(paths[j])]
            rows = rows or list(range(len(diff_idx)))
            owner[o, rows] = 1.0 / len(rows)
        self._owner = jnp.asarray(owner)
        try:
            hash(apply_fn)
        except TypeError:  # jit needs a hashable static argument; a wrapper is hashed by identity.
            apply_fn = functools.partial(apply_fn)
        self._apply_fn = apply_fn
        self._fixed_other: list[jax.Array] | None = None  # see use_statistics

    def use_statistics(self, variables: Variables | None) -> None:
        """Hold the non-differentiated leaves (BatchNorm statistics) at those of ``variables`` (e.g. the
        soup recalibrated) in the loss, evaluation and ``mix``, instead of mixing them; None mixes again."""
        if variables is None:
            self._fixed_other = None
            return
        leaves = self.ingredients.layout.leaves(variables, "the statistics' variables")
        self._fixed_other = [jnp.asarray(leaves[j], jnp.float32) for j in self.spec.other_idx]

    # -- mixing weights --------------------------------------------------------------------------

    def init_logits(self, init: str | Sequence[float] = "uniform", seed: int = 0) -> jax.Array:
        """Initial mixing logits: 'uniform' (all 0), 'random' (N(0, 0.1^2), seeded) or K weights."""
        shape = (self.k,) if self.mode == "global" else (len(self.spec.diff_idx), self.k)
        if isinstance(init, str):
            if init == "uniform":
                return jnp.asarray(np.zeros(shape, np.float32))
            if init == "random":
                return jnp.asarray(0.1 * np.random.default_rng(seed).normal(size=shape).astype(np.float32))
            raise ValueError(f"init must be 'uniform', 'random' or K weights, got {init!r}")
        w = np.asarray(init, np.float64)
        if w.shape != (self.k,) or np.any(w <= 0):
            raise ValueError(f"init weights must be {self.k} positive numbers, got {init!r}")
        return jnp.asarray(np.broadcast_to(np.log(w / w.sum()), shape).astype(np.float32))

    def alphas(self, logits: jax.Array) -> jax.Array:
        """The (leaves, K) mixing weight of every leaf of the variables tree."""
        return _alphas_jit(self.spec, self.mode, self._owner, logits)

    def weights(self, logits: jax.Array) -> np.ndarray | dict[str, np.ndarray]:
        """Mixing weights for the report: (K,) in global mode, {param path: (K,)} in layer mode."""
        z = np.asarray(logits, np.float64)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p = (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)
        if self.mode == "global":
            return p
        return {path: p[r] for r, path in enumerate(self.diff_paths)}

    # -- streaming passes ------------------------------------------------------------------------

    def mix_leaves(self, logits: jax.Array) -> list[jax.Array]:
        """Pass over the ingredients: the float32 leaves of ``sum_i alpha_i theta_i``."""
        a = np.asarray(self.alphas(logits))  # (leaves, K), tiny: its columns go to the kernels
        acc = None
        for i in range(self.k):
            leaves = self.ingredients.leaves(i)
            acc = _mix_first(leaves, a[:, i]) if acc is None else _mix_add_donated(acc, leaves, a[:, i])
            # As in RunningMean.add: don't let loading run ahead of the queued additions.
            jax.block_until_ready(acc)
            del leaves
        return acc

    def mix(self, logits: jax.Array) -> Variables:
        """The soup for ``logits``, each leaf cast back to its stored dtype (statistics: the fixed ones
        when ``use_statistics`` set them)."""
        layout = self.ingredients.layout
        leaves = self.mix_leaves(logits)
        if self._fixed_other is not None:
            for j, x in zip(self.spec.other_idx, self._fixed_other):
                leaves[j] = x
        return layout.unflatten(cast_leaves(leaves, layout.dtypes))

    def _split(self, leaves):
        other = self._fixed_other
        if other is None:
            other = [leaves[j] for j in self.spec.other_idx]
        return [leaves[j] for j in self.spec.diff_idx], other

    def loss_and_grad(
        self, logits: jax.Array, temperature: jax.Array, batch: Batch
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """The streamed gradient: ``(loss, dL/dlogits, dL/dtemperature, (n_real, n_correct))``.

        Two passes over the ingredients (mix, then inner products); never more than one ingredient,
        the mixed model and its gradient on the device.
        """
        batch = _batch_arrays(batch)
        diff, other = self._split(self.mix_leaves(logits))
        loss, aux, g_diff, g_t = _grad_step(self._apply_fn, self.spec, diff, other, jnp.float32(temperature), batch)
        del other
        g_alpha = []  # <g, theta_i - theta_mix> per differentiated leaf: see _inner for why not <g, theta_i>
        for i in range(self.k):
            g_alpha.append(_inner(self.spec.diff_idx, g_diff, diff, self.ingredients.leaves(i)))
            jax.block_until_ready(g_alpha[-1])  # one ingredient in flight at a time
        del g_diff, diff
        return loss, _logit_grad(self.spec, self.mode, self._owner, logits, g_alpha), g_t, aux

    def evaluate(self, logits: jax.Array, temperature: jax.Array, batches: Batches) -> tuple[float, float]:
        """Held-out (loss, accuracy) of the soup for ``logits``: one mixing pass, then forward passes."""
        diff, other = self._split(self.mix_leaves(logits))
        total_loss = total_n = total_correct = 0.0
        for batch in batches():
            loss, (n, correct) = _batch_loss_jit(
                self._apply_fn, self.spec, diff, other, jnp.float32(temperature), _batch_arrays(batch)
            )
            total_loss += float(loss) * float(n)
            total_n += float(n)
            total_correct += float(correct)
        if total_n == 0:
            raise ValueError("the held-out batches are empty")
        return total_loss / total_n, total_correct / total_n


def _batch_arrays(batch: Batch) -> dict[str, Any]:
    """Only the keys the loss needs; a missing mask means every example is real."""
    out = {"image": batch["image"], "label": batch["label"]}
    out["mask"] = batch["mask"] if "mask" in batch else np.ones(np.shape(batch["label"]), np.float32)
    return out


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float):
    """Adam and its jitted update, cached per learning rate so that repeated soups reuse the compile."""
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step


def learned(
    loaders: Sequence[Loader],
    apply_fn: ApplyFn,
    heldout_batches: Batches,
    *,
    mode: str = "global",
    epochs: int = 5,
    learning_rate: float = 0.05,
    init: str | Sequence[float] = "uniform",
    memory_budget_bytes: int | None = None,
    seed: int = 0,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    recalibrate: Callable[[Variables], Variables] | None = None,
) -> LearnedResult:
    """Learns the mixing weights of a soup on the held-out split (the paper's "learned soup").

    Args:
      loaders: one zero-argument callable per ingredient, each returning a variables tree.
      apply_fn: ``apply_fn(variables, images) -> logits``, jittable, in inference mode (BatchNorm uses
        the mixed running statistics).
      heldout_batches: a zero-argument callable returning an iterable of ``{'image', 'label', 'mask'}``
        dicts (mask 1 for real examples, 0 for padding); called again for every epoch and evaluation.
      mode: 'global' (one weight per ingredient) or 'layer' (one per ingredient per parameter tensor).
      epochs: passes over the held-out batches, one Adam step per batch.
      learning_rate: Adam learning rate for the mixing logits and the log of the temperature.
      init: 'uniform' (the uniform soup), 'random' (small seeded logits) or K positive weights.
      memory_budget_bytes: host memory the K ingredients may take (None: keep them on the host).
      seed: seeds init='random'; the batch order is the caller's.
      on_epoch: called with each history entry as it is recorded (logging, plots).
      recalibrate: ``recalibrate(soup) -> soup`` with its BatchNorm statistics recomputed (e.g.
        ``batchnorm.recalibrate`` on training batches). Given, and when the ingredients have
        statistics, it is called on the soup of the current weights before the first epoch and after
        each epoch; those statistics replace the mixed ones in the loss, the recorded history and the
        returned soup. Without it the statistics are mixed like the weights.

    Returns:
      A LearnedResult. The temperature only sharpens the training loss; accuracy is that of the soup.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    problem = MixingProblem(Ingredients(loaders, memory_budget_bytes), apply_fn, mode)
    # The temperature is exp(log_temperature): see the module docstring for why it is not learned plainly.
    params = {"logits": problem.init_logits(init, seed), "log_temperature": jnp.float32(0.0)}
    tx, adam_step = _adam(float(learning_rate))
    opt_state = tx.init(params)

    history: list[dict[str, Any]] = []

    def recalibrate_statistics() -> None:
        # Once per epoch, not per step: a recalibration is many forward passes, and the weights move
        # little within an epoch (one step per held-out batch).
        if recalibrate is not None and problem.spec.other_idx:
            problem.use_statistics(None)
            problem.use_statistics(recalibrate(problem.mix(params["logits"])))

    def record(epoch: int, train_loss: float | None) -> None:
        loss, accuracy = problem.evaluate(params["logits"], jnp.exp(params["log_temperature"]), heldout_batches)
        entry = dict(epoch=epoch, loss=loss, heldout_accuracy=accuracy, train_loss=train_loss)
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)

    recalibrate_statistics()
    record(0, None)
    for epoch in range(1, epochs + 1):
        loss_sum = n_sum = 0.0
        for batch in heldout_batches():
            temperature = jnp.exp(params["log_temperature"])
            loss, g_logits, g_t, (n, _) = problem.loss_and_grad(params["logits"], temperature, batch)
            # dL/dlog_t = t * dL/dt.
            grads = {"logits": g_logits, "log_temperature": temperature * g_t}
            params, opt_state = adam_step(params, opt_state, grads)
            loss_sum += float(loss) * float(n)
            n_sum += float(n)
        recalibrate_statistics()
        record(epoch, loss_sum / max(n_sum, 1.0))

    return LearnedResult(
        variables=problem.mix(params["logits"]),
        weights=problem.weights(params["logits"]),
        temperature=float(jnp.exp(params["log_temperature"])),
        history=history,
        heldout=history[-1]["heldout_accuracy"],
        logits=np.asarray(params["logits"]),
    )
