"""Soup recipes: pure functions over variable pytrees.

A *soup* is a weighted average of the weights of K fine-tuned models (the *ingredients*) that share one
pretrained initialisation (Wortsman et al., "Model soups", ICML 2022, arXiv 2203.05482). This module
knows nothing about files, models or data sets; it is given callables:

* ``Loader = Callable[[], Variables]`` loads one ingredient lazily (e.g. from disk). Recipes call a
  loader when they need that ingredient and drop the tree right after, so memory stays flat in K.
* ``HeldoutEval = Callable[[Variables], float]`` returns the held-out accuracy of a candidate soup. It is
  the only accuracy the greedy and pruned recipes see; the test split never reaches this module.
* ``TensorSource`` (a protocol, from ``soupjax.io.trees``, re-exported here) is one ingredient that can
  be read one tensor at a time: its ``structure`` (a tree of ``jax.ShapeDtypeStruct``) and
  ``read(path)`` for one '/'-joined path. ``uniform_by_tensor`` and ``weighted_by_tensor`` stream over
  it tensor by tensor through the per-tensor engine (``soupjax.arithmetic.engine``, which every merge
  uses too), so memory is the soup plus a few tensors, never a second whole model.
  ``checkpoints.IngredientTensors`` is the on-disk source, ``TreeSource`` the in-memory one.

``Variables`` is any mapping pytree, e.g. ``{'params': ..., 'batch_stats': ...}``. Arithmetic applies to
the whole tree, so BatchNorm statistics are averaged exactly like parameters.

All arithmetic is float32 (a float32 running sum, whatever the stored dtype), and every result is cast
back to the dtype each leaf was stored in, so a bfloat16 checkpoint gives a bfloat16 soup without the
rounding error of summing K bfloat16 tensors. The sum is of displacements from the first ingredient
(see ``RunningMean``), so a soup of one ingredient, or of K copies of one, is that ingredient exactly.
Integer leaves are exact while their sums stay within float32's integers (|sum| <= 2**24).

The cost of that exactness is the reference: a ``RunningMean`` holds the first ingredient besides its
float32 sum (a model in its stored dtypes, on the device; shared, not copied, when the caller passed
device arrays), and the per-tensor soups one tensor of it at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from soupjax.arithmetic import engine
from soupjax.arithmetic.engine import BUFFER, FRESH, Read
from soupjax.io.trees import Layout, TensorSource, TreeSource, cast_traced, source_layout

Variables = Mapping[str, Any]
Loader = Callable[[], Variables]
HeldoutEval = Callable[[Variables], float]

__all__ = [
    "Variables",
    "Loader",
    "HeldoutEval",
    "accepts",
    "RunningMean",
    "SoupResult",
    "uniform",
    "weighted",
    "TensorSource",
    "TreeSource",
    "uniform_by_tensor",
    "weighted_by_tensor",
    "greedy",
    "visit_order",
    "pruned",
    "interpolate",
]


# The jitted kernels take and return *lists* of leaves; jit caches one executable per layout. The
# running sum is donated, so an add or remove updates it in place instead of holding two sums.
#
# The sum is of displacements from a reference, the first ingredient added: sum_i w_i (x_i - ref), and
# the mean is ref + sum / total weight. Summing the ingredients themselves rounds at every add, so a
# soup of K copies of one model came back up to (K - 1) / 2 float32 ulps away from it (2 ulps at K = 7)
# and a soup of one ingredient with a weight other than 1 was not that ingredient. With displacements,
# K copies add K exact zeros and the soup is the ingredient itself; and since ingredients fine-tuned
# from one init agree in most of their digits, the displacements are small numbers whose sum rounds
# far less than the sum of the weights themselves would.


def _reference(leaves):
    """The first tree's leaves on the device, as they are: ``device_put`` does not copy a leaf already
    there (a jitted identity would, one more model in memory), and copies a host array there once."""
    return jax.device_put(list(leaves))


@jax.jit
def _zeros_f32(leaves):
    return [jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves]


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _accumulate(acc, leaves, ref, w):
    return [a + w * (_f32(x) - _f32(r)) for a, x, r in zip(acc, leaves, ref)]


_accumulate_donated = jax.jit(_accumulate, donate_argnums=0)


def _finish_from_reference(dtypes):
    """A jitted ``(sum, ref, extra, w, scale, denom) -> cast(scale * ref + (sum + w (extra - ref)) / denom)``."""

    @jax.jit
    def finish(acc, ref, extra, w, scale, denom):
        out = []
        for i, (a, r, d) in enumerate(zip(acc, ref, dtypes)):
            if extra is not None:
                a = a + w * (_f32(extra[i]) - _f32(r))
            out.append(cast_traced(scale * _f32(r) + a / denom, d))
        return out

    return finish


@functools.lru_cache(maxsize=None)
def _reference_finisher_named(names: tuple[str, ...]) -> Callable[..., Any]:
    return _finish_from_reference(tuple(np.dtype(n) for n in names))


def _reference_finisher(dtypes: tuple[Any, ...]) -> Callable[..., Any]:
    """One jitted finisher per dtype layout, kept for the process: every soup of a sweep has the same
    layout, so it is traced once (keyed by dtype names, which hash where dtype objects may not)."""
    return _reference_finisher_named(tuple(np.dtype(d).name for d in dtypes))


# --------------------------------------------------------------------------------------------------
# The running mean: the one object every streaming recipe is built on.


class RunningMean:
    """A streaming float32 weighted sum of variable trees.

    Holds one float32 sum and the first tree added, the reference (never the K ingredients): ``add``
    and ``remove`` update the sum in place (the old buffer is donated to XLA), so a uniform soup of K
    models needs memory for the sum, the reference and the one ingredient being added. The reference
    is the first tree's own leaves where they are on the device already (not copied, so a caller that
    keeps that tree shares it) and a device copy of leaves given in host memory. The sum is of
    displacements from the reference, ``sum_i w_i (tree_i - ref)``, and the mean is
    ``ref + sum / count`` (see the kernels above for why): a mean of one tree, or of K copies of it, is
    that tree exactly. ``remove`` is algebraic (``sum -= w * (tree - ref)``), which is what makes the
    pruned soup cheap: dropping an ingredient, the reference included, never re-reads the others.
    Removal is exact up to float32 rounding of the sum.

    ``mean()`` and ``total()`` cast each leaf back to the dtype it was stored in.
    """

    def __init__(self) -> None:
        self._layout: Layout | None = None
        self._ref: list[jax.Array] | None = None
        self._sum: list[jax.Array] | None = None
        self._count = 0.0
        self._n = 0

    @property
    def count(self) -> float:
        """The total weight added so far (the number of trees for unit weights)."""
        return self._count

    @property
    def num_trees(self) -> int:
        """How many trees are in the sum (adds minus removes), whatever their weights."""
        return self._n

    @property
    def layout(self) -> Layout | None:
        return self._layout

    def add(self, tree: Variables, weight: float = 1.0) -> None:
        """Adds ``weight * tree`` to the sum. Raises ValueError if its structure or shapes differ."""
        if self._layout is None:
            self._layout, leaves = Layout.of(tree)
            self._ref = _reference(leaves)  # on the device, in the stored dtypes
            self._sum = _zeros_f32(leaves)  # the reference's own displacement
        else:
            leaves = self._layout.leaves(tree, "ingredient")
            self._sum = _accumulate_donated(self._sum, leaves, self._ref, jnp.float32(weight))
        # Wait for the add: with asynchronous dispatch the caller could otherwise load the next
        # ingredients while this one is still referenced by a queued computation, and memory would
        # grow with how far loading runs ahead.
        jax.block_until_ready(self._sum)
        self._count += float(weight)
        self._n += 1

    def remove(self, tree: Variables, weight: float = 1.0) -> None:
        """Subtracts ``weight * tree`` from the sum: the inverse of ``add(tree, weight)``."""
        if self._layout is None or self._n == 0:
            raise ValueError("cannot remove from an empty RunningMean")
        leaves = self._layout.leaves(tree, "ingredient")
        self._sum = _accumulate_donated(self._sum, leaves, self._ref, jnp.float32(-weight))
        jax.block_until_ready(self._sum)
        self._count -= float(weight)
        self._n -= 1

    def mean(self) -> Variables:
        """The sum divided by ``count``, each leaf cast back to its stored dtype."""
        return self._finish(None, 0.0, 1.0, self._count)

    def total(self) -> Variables:
        """The (unnormalised) weighted sum, each leaf cast back to its stored dtype."""
        return self._finish(None, 0.0, self._count, 1.0, check=False)

    def mean_with(self, tree: Variables, weight: float = 1.0) -> Variables:
        """The mean as if ``tree`` were added with ``weight``, without changing the running sum.

        A greedy soup's candidate: memory for one more tree (the result), no second float32 sum.
        A negative weight gives the mean without ``tree`` (see ``mean_without``).
        """
        if self._layout is None:
            raise ValueError("RunningMean is empty")
        leaves = self._layout.leaves(tree, "ingredient")
        return self._finish(leaves, weight, 1.0, self._count + weight)

    def mean_without(self, tree: Variables, weight: float = 1.0) -> Variables:
        """The mean as if ``tree`` were removed, without changing the running sum (pruned soup)."""
        return self.mean_with(tree, -weight)

    def _finish(self, extra, weight: float, scale: float, denom: float, check: bool = True) -> Variables:
        if self._layout is None:
            raise ValueError("RunningMean is empty")
        if check and abs(denom) < 1e-12:
            raise ValueError(f"the total weight is {denom}; the mean is undefined")
        out = _reference_finisher(self._layout.dtypes)(
            self._sum, self._ref, extra, jnp.float32(weight), jnp.float32(scale), jnp.float32(denom))
        return self._layout.unflatten(out)


# --------------------------------------------------------------------------------------------------
# Recipes.


@dataclasses.dataclass
class SoupResult:
    """What a selecting recipe (greedy, pruned) returns.

    Attributes:
      variables: the soup.
      used: indices (into the loaders) of the ingredients in the soup, in the order they were added
        (greedy) or in index order (pruned).
      weights: one weight per ingredient (all K), 1/len(used) for used ones and 0 for the others.
      heldout: held-out accuracy of the final soup.
      progression: one dict per evaluated step, for the report ("held-out accuracy with N ingredients"):
        ``step`` (0 is the starting soup), ``ingredient`` (index, None for the start of a pruned soup),
        ``action`` ('add' | 'skip' for greedy; 'start' | 'remove' | 'keep' for pruned), ``heldout`` (the
        held-out accuracy of the candidate evaluated at that step), ``n_ingredients`` (ingredients in the
        soup after the decision) and ``soup_heldout`` (held-out accuracy of the soup after the decision).
    """

    variables: Variables
    used: list[int]
    weights: list[float]
    heldout: float
    progression: list[dict[str, Any]]


def uniform(loaders: Sequence[Loader]) -> Variables:
    """The uniform soup: the mean of all ingredients, streamed (one float32 sum, its reference, one
    ingredient)."""
    return weighted(loaders, [1.0] * len(loaders), normalize=True)


def weighted(
    loaders: Sequence[Loader], weights: Sequence[float], normalize: bool = True
) -> Variables:
    """``sum_i w_i * theta_i`` (divided by ``sum_i w_i`` when ``normalize``), streamed.

    Ingredients with weight 0 are not loaded. With ``normalize=False`` this is the raw linear
    combination (task-arithmetic style), so the weights need not sum to 1.
    """
    if len(loaders) != len(weights):
        raise ValueError(f"{len(loaders)} loaders but {len(weights)} weights")
    if not loaders:
        raise ValueError("a soup needs at least one ingredient")
    acc = RunningMean()
    for i, (load, w) in enumerate(zip(loaders, weights)):
        if w == 0:
            continue
        acc.add(_load(load, i), float(w))
    if acc.layout is None:
        raise ValueError("all weights are 0")
    return acc.mean() if normalize else acc.total()


# --------------------------------------------------------------------------------------------------
# Per-tensor streaming: one tensor of each ingredient at a time.


def uniform_by_tensor(sources: Sequence[TensorSource], **kw: Any) -> Variables:
    """The uniform soup, streamed one tensor at a time (see ``weighted_by_tensor``)."""
    return weighted_by_tensor(sources, [1.0] * len(sources), normalize=True, **kw)


def _source_name(source: Any, index: int) -> str:
    name = getattr(source, "name", None)
    return f"ingredient {index} ({name})" if name else f"ingredient {index}"


def weighted_by_tensor(
    sources: Sequence[TensorSource],
    weights: Sequence[float],
    normalize: bool = True,
    *,
    threads: int | None = None,
    prefetch_bytes: int | None = None,
) -> Variables:
    """``weighted`` streamed per tensor: the same soup, with memory for one model instead of two.

    For each tensor in turn, that tensor of each ingredient is read; the first ingredient's is the
    reference x0 and the others add ``w * (x - x0)`` to a float32 accumulator of that tensor's size (in
    ingredient order, as ``RunningMean`` does); the soup's tensor is ``x0 + accumulator / total weight``
    (``W * x0 + accumulator`` without ``normalize``), cast back to the stored dtype (integers rounded),
    and the next tensor begins. The reads run ahead of the arithmetic on ``threads`` threads within
    ``prefetch_bytes`` (``engine.by_tensor``, whose defaults these are). Peak memory is the soup plus
    the prefetched tensors and one accumulator: flat in K, and no second model. With sources that have
    ``read_into`` (as ``checkpoints.IngredientTensors`` does), a float32 tensor of the first ingredient
    is read straight into the soup and the others into reused buffers.

    Every source's structure is checked against the first's before anything is read (a ValueError
    names the first differing path); ingredients with weight 0 are not touched. The result is a tree
    of numpy arrays in host memory, equal to ``weighted``'s up to float32 rounding: both add the same
    displacements in the same order, but numpy rounds each operation while XLA may fuse or reorder them.
    """
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    if not sources:
        raise ValueError("a soup needs at least one ingredient")
    active = [(i, src, float(w)) for i, (src, w) in enumerate(zip(sources, weights)) if w != 0]
    if not active:
        raise ValueError("all weights are 0")
    layouts = [source_layout(src, _source_name(src, i)) for i, src, _ in active]
    layout = layouts[0]
    for (i, src, _), other in zip(active[1:], layouts[1:]):
        layout.check(other, _source_name(src, i))
    total = sum(w for _, _, w in active)
    if normalize and abs(total) < 1e-12:
        raise ValueError(f"the total weight is {total}; the mean is undefined")
    denom = np.float32(total) if normalize else None

    f32 = np.dtype(np.float32)
    # The first ingredient's float32 tensors are read fresh: each becomes the soup's tensor in place.
    plan = [[Read(src, _source_name(src, i), other.dtypes[j], a == 0 and other.dtypes[j] == f32)
             for a, ((i, src, _), other) in enumerate(zip(active, layouts))]
            for j in range(len(layout.paths))]
    ws = [w for _, _, w in active]

    def reduce(j: int, reads: Any) -> np.ndarray:
        # As RunningMean: the first ingredient's tensor is the reference x0, the others add
        # w (x - x0) to a float32 sum, and the soup is x0 + sum / total (W x0 + sum unnormalised).
        x0 = acc = None
        for (x, kind), w in zip(reads, ws):
            if x0 is None:
                # Read into a new array for this (FRESH): it becomes the soup's tensor. Otherwise
                # copy: a buffer is reused and a source's own array must not be written.
                x0 = x if kind == FRESH and x.dtype == f32 else x.astype(f32)
                continue
            in_buffer = kind == BUFFER and x.dtype == f32
            d = np.subtract(x, x0, out=x) if in_buffer else np.subtract(x.astype(f32, copy=False), x0)
            if w != 1.0:
                np.multiply(d, np.float32(w), out=d)
            if acc is None:
                acc = d.copy() if in_buffer else d
            else:
                np.add(acc, d, out=acc)
            del x, d
        if denom is None:
            np.multiply(x0, np.float32(total), out=x0)
        if acc is not None:
            if denom is not None:
                np.divide(acc, denom, out=acc)
            np.add(x0, acc, out=x0)
        return x0

    return engine.by_tensor(layout, plan, reduce, threads=threads, prefetch_bytes=prefetch_bytes)


def _load(load: Loader, index: int) -> Variables:
    tree = load()
    if not isinstance(tree, Mapping):
        raise TypeError(f"loader {index} returned {type(tree).__name__}, expected a mapping of variables")
    return tree


def _step(step, ingredient, action, heldout, n, soup_heldout) -> dict[str, Any]:
    return dict(
        step=step,
        ingredient=ingredient,
        action=action,
        heldout=float(heldout),
        n_ingredients=n,
        soup_heldout=float(soup_heldout),
    )


def accepts(score: float, best: float, *, strict: bool = False) -> bool:
    """The greedy rule: a candidate is taken when its held-out accuracy does not fall (``>=``, the paper's
    Recipe 1), or with ``strict`` only when it rises (``>``, the official code). One rule for the greedy
    and pruned soups and the greedy ensemble."""
    return score > best or (not strict and score == best)


def visit_order(k: int, heldout_scores: Sequence[float] | None, *, order: str = "sorted", seed: int = 0,
                ties: str = "index") -> list[int]:
    """The order greedy visits K ingredients in: best held-out score first (``order='sorted'``), ties in index
    order (``ties='index'``) or reversed (``'official'``: model-soups' ``main.py`` sorts ascending, reverses)."""
    if ties not in ("index", "official"):
        raise ValueError(f"ties must be 'index' or 'official', got {ties!r}")
    if order == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(k)]
    if order != "sorted":
        raise ValueError(f"order must be 'sorted' or 'random', got {order!r}")
    if heldout_scores is None:
        raise ValueError("order='sorted' needs heldout_scores")
    scores = np.asarray(heldout_scores, np.float64)
    if ties == "index":  # a stable sort on the negated scores: best first, ties in index order
        return [int(i) for i in np.argsort(-scores, kind="stable")]
    # The official code's order: a stable ascending sort, reversed (ties in reverse index order).
    return [int(i) for i in np.argsort(scores, kind="stable")[::-1]]


def greedy(
    loaders: Sequence[Loader],
    heldout_scores: Sequence[float] | None,
    evaluate: HeldoutEval,
    *,
    strict: bool = False,
    order: str = "sorted",
    seed: int = 0,
    evaluate_first: bool = False,
    ties: str = "index",
) -> SoupResult:
    """The greedy soup (Wortsman et al. 2022, Recipe 1).

    Ingredients are visited best first by their individual held-out accuracy ``heldout_scores``
    (``order='sorted'``) or in a seeded random order (``order='random'``, the paper's "greedy soup,
    random order" ablation); tied scores by ``ties`` (``visit_order``: 'index' or the official
    code's 'official'). The soup starts as the first ingredient; each next one is added if the held-out accuracy of the soup with it does not fall: ``>=`` as in the paper's
    Recipe 1 (so equally good ingredients join and the soup gets flatter), ``>`` with ``strict=True``
    (what the official mlfoundations/model-soups ``main.py`` does).

    The first ingredient's accuracy is taken from ``heldout_scores`` (as the official code does), so
    ``evaluate`` runs K-1 times; pass ``heldout_scores=None`` with ``order='random'``, or
    ``evaluate_first=True``, to evaluate it. ``evaluate_first`` is for an ``evaluate`` that measures
    differently from the scores (e.g. it recalibrates BatchNorm statistics first): every candidate is
    then compared with the first ingredient measured the same way, and the scores only set the order.

    Memory: one float32 running sum, its reference (the first ingredient), the ingredient being tried
    and the candidate soup. ``evaluate`` sees only candidate soups; it must measure held-out (never
    test) accuracy.
    """
    k = len(loaders)
    if k == 0:
        raise ValueError("a soup needs at least one ingredient")
    if heldout_scores is not None and len(heldout_scores) != k:
        raise ValueError(f"{k} loaders but {len(heldout_scores)} held-out scores")
    visit = visit_order(k, heldout_scores, order=order, seed=seed, ties=ties)
    acc = RunningMean()
    first = visit[0]
    tree = _load(loaders[first], first)
    acc.add(tree)
    if heldout_scores is not None and not evaluate_first:
        best = float(heldout_scores[first])
    else:
        best = float(evaluate(acc.mean()))
    del tree
    used = [first]
    progression = [_step(0, first, "add", best, 1, best)]

    for step, i in enumerate(visit[1:], start=1):
        # On the device once: the candidate and (if kept) the running sum both read this copy.
        tree = jax.device_put(_load(loaders[i], i))
        candidate = acc.mean_with(tree)
        score = float(evaluate(candidate))
        del candidate  # free before the next load: at most sum + reference + ingredient + candidate.
        if accepts(score, best, strict=strict):
            acc.add(tree)
            used.append(i)
            best = score
            progression.append(_step(step, i, "add", score, len(used), best))
        else:
            progression.append(_step(step, i, "skip", score, len(used), best))
        del tree

    weights = [0.0] * k
    for i in used:
        weights[i] = 1.0 / len(used)
    return SoupResult(acc.mean(), used, weights, best, progression)


def pruned(
    loaders: Sequence[Loader],
    evaluate: HeldoutEval,
    *,
    passes: int = 1,
    heldout_scores: Sequence[float] | None = None,
    ranking: Sequence[int] | None = None,
    strict: bool = False,
) -> SoupResult:
    """The pruned soup: start from the uniform soup of all K and remove ingredients that do not help.

    Following the "pruned soup" of Menes et al. / Sobral et al., "Model soups to increase inference
    without increasing compute time" (arXiv 2301.10092): for ``passes`` passes, visit the ingredients
    still in the soup and remove one if the held-out accuracy of the soup without it does not fall
    (``>=``; ``>`` with ``strict=True``). The last ingredient is never removed. A pass that removes
    nothing ends the search early, since (for a deterministic ``evaluate``) every later pass would
    repeat it.

    Visiting order: ``ranking`` if given (a permutation of ``range(K)``), else worst first by
    ``heldout_scores`` (ties in index order), else index order. Worst first is the mirror image of the
    greedy soup's best first: the weakest ingredients are the likeliest to drag the soup down, so they
    are offered for removal before a good one is dropped for a noise-level gain.

    Removal is algebraic on the float32 running sum (one load of the removed ingredient, no re-reading
    the rest). Memory: one running sum and its reference, one ingredient and one candidate. ``evaluate`` runs
    1 + (ingredients visited) times and sees only candidate soups (held-out accuracy only).
    """
    k = len(loaders)
    if k == 0:
        raise ValueError("a soup needs at least one ingredient")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if ranking is not None:
        visit = [int(i) for i in ranking]
        if sorted(visit) != list(range(k)):
            raise ValueError(f"ranking must be a permutation of range({k}), got {list(ranking)}")
    elif heldout_scores is not None:
        if len(heldout_scores) != k:
            raise ValueError(f"{k} loaders but {len(heldout_scores)} held-out scores")
        visit = [int(i) for i in np.argsort(np.asarray(heldout_scores, np.float64), kind="stable")]
    else:
        visit = list(range(k))

    acc = RunningMean()
    for i, load in enumerate(loaders):
        acc.add(_load(load, i))
    in_soup = set(range(k))
    current = float(evaluate(acc.mean()))
    progression = [_step(0, None, "start", current, k, current)]

    step = 0
    for _ in range(passes):
        removed_this_pass = False
        for i in visit:
            if i not in in_soup or len(in_soup) == 1:
                continue  # already removed, or the last one left: a soup needs an ingredient.
            step += 1
            tree = jax.device_put(_load(loaders[i], i))
            candidate = acc.mean_without(tree)
            score = float(evaluate(candidate))
            del candidate
            if accepts(score, current, strict=strict):
                acc.remove(tree)
                in_soup.discard(i)
                current = score
                removed_this_pass = True
                progression.append(_step(step, i, "remove", score, len(in_soup), current))
            else:
                progression.append(_step(step, i, "keep", score, len(in_soup), current))
            del tree
        if not removed_this_pass:
            break

    used = sorted(in_soup)
    weights = [1.0 / len(used) if i in in_soup else 0.0 for i in range(k)]
    return SoupResult(acc.mean(), used, weights, current, progression)


@jax.jit
def _lerp(a_leaves, b_leaves, alpha):
    return [
        (1.0 - alpha) * jnp.asarray(a).astype(jnp.float32) + alpha * jnp.asarray(b).astype(jnp.float32)
        for a, b in zip(a_leaves, b_leaves)
    ]


def interpolate(a: Variables, b: Variables, alpha: float) -> Variables:
    """``(1 - alpha) * a + alpha * b`` in float32, cast back to ``a``'s stored dtypes.

    ``alpha=0`` returns ``a`` and ``alpha=1`` returns ``b`` bit for bit (the endpoints are returned,
    not computed, so signed zeros, infinities and NaNs survive too). Used for WiSE-FT-style curves
    between two ingredients or between the initialisation and a soup.
    """
    layout, a_leaves = Layout.of(a)
    b_leaves = layout.leaves(b, "interpolation endpoint b")
    alpha = float(alpha)
    if alpha == 0.0:
        return layout.unflatten([_as_stored(x, d) for x, d in zip(a_leaves, layout.dtypes)])
    if alpha == 1.0:
        return layout.unflatten([_as_stored(x, d) for x, d in zip(b_leaves, layout.dtypes)])
    mixed = _lerp(a_leaves, b_leaves, jnp.float32(alpha))
    return layout.unflatten([cast_traced(x, d) for x, d in zip(mixed, layout.dtypes)])


def _as_stored(x: Any, dtype: Any) -> jax.Array:
    """The endpoint itself as a jax array (a copy only when its dtype differs from ``a``'s)."""
    x = jnp.asarray(x)
    return x if x.dtype == dtype else x.astype(dtype)
