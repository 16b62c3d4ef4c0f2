"""Merge methods beyond the soup: the per-tensor arithmetic of the mergekit-style merges.

Every method here merges K fine-tuned ingredients theta_1..theta_K that share one initialisation theta_0
through their *displacements* (task vectors) tau_i = theta_i - theta_0, ONE TENSOR AT A TIME: the
functions take numpy arrays of one parameter (float32 in, float32 out) and know nothing about files,
trees or JAX. ``merge_by_tensor`` applies one of them to whole models, streamed tensor by tensor.

* **Task arithmetic** (Ilharco et al., "Editing models with task arithmetic", ICLR 2023):
  ``theta_0 + lam * sum_i tau_i``.
* **TIES** (Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023):
  trim each tau_i to its ``density`` fraction of largest magnitudes, elect a sign per entry from the
  total mass of the trimmed taus, and average (the *disjoint mean*) only the entries that agree with it.
* **DARE** (Yu et al., "Language models are Super Mario", ICML 2024): drop each entry of tau_i with
  probability p and rescale the survivors by 1 / (1 - p) (unbiased), then combine linearly or as TIES.
* **SLERP** (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985), as mergekit uses it:
  spherical interpolation between two ingredients, on their displacements from theta_0 here.
* **Spherical mean**: the Karcher (Frechet) mean of the K directions on the unit sphere, scaled by the
  mean length: SLERP's generalisation to K ingredients.
* **Model Stock** (Jang et al., "Model Stock: all we need is just a few fine-tuned models", ECCV 2024):
  ``theta_0 + t * mean_i tau_i`` with t from the mean pairwise cosine of the taus, per layer.

Conventions for lam (they differ between methods, as in the papers and in mergekit):

* task arithmetic and DARE-linear scale the SUM of the displacements by lam, so lam = 1/K is the
  uniform soup;
* TIES and DARE-TIES scale the disjoint MEAN by lam, so lam = 1 keeps the agreed displacement's size:
  with density 1 and no sign conflict, ``ties(lam) == task_arithmetic(lam / K)``.

Where soupjax's conventions differ from mergekit 0.1.5's (TIES keeps ceil(d n) entries and elects no
sign at a sum of 0, DARE rescales by 1 / (1 - p), Model Stock leaves zero displacements out and clips t
at 0, SLERP and the spherical mean work on displacements), docs/merge_conventions.md says so, with the
mergekit setting that gives the same result; tests/test_mergekit.py checks both.

Everything is per tensor: "one tensor = one layer" for Model Stock's angle, TIES's top-k is over one
tensor, and SLERP's angle is between two flattened tensors. Element-wise work is done in float64
(displacements of float32 values are then exact, and each result is rounded to float32 once), as are
the dot products, norms and angles; the working copies of one tensor cost 8 bytes per entry.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from soupjax.arithmetic import engine
from soupjax.arithmetic.engine import FRESH, Read
from soupjax.io.trees import TensorSource, source_layout

__all__ = [
    "statistics_rule",
    "task_arithmetic",
    "trim_top",
    "elect_sign",
    "disjoint_mean",
    "ties",
    "tensor_rng",
    "dare_drop",
    "dare",
    "slerp",
    "spherical_mean",
    "model_stock_ratio",
    "model_stock",
    "model_stock_with_ratio",
    "merge_by_tensor",
]

# Above this |cos(angle)|, two directions count as parallel (or antiparallel) and slerp is the linear
# blend, as in mergekit (its ``dot_threshold``). A threshold on sin W near 0 is not enough: the float32
# rounding of stored weights alone puts displacements 1e-2 the size of the weights at sin W ~ 5e-6 from
# (anti)parallel, where the coefficients sin(t W)/sin W divide rounding noise by rounding noise (issue
# 17). At |cos W| = 0.9995 (W ~ 1.8 degrees) the linear blend is itself within ~1e-4 of the slerp.
_PARALLEL_COS = 0.9995


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _taus(x0: np.ndarray, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The displacements x_i - x0 in float64 (exact for float32 inputs of similar magnitude)."""
    if not len(xs):
        raise ValueError("a merge needs at least one ingredient")
    base = _f64(x0)
    out = []
    for i, x in enumerate(xs):
        if np.shape(x) != base.shape:
            raise ValueError(f"ingredient {i} has shape {np.shape(x)}, the init has shape {base.shape}")
        out.append(_f64(x) - base)
    return out


def _finish(x0: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """x0 + delta, rounded to float32 once."""
    return (_f64(x0) + delta).astype(np.float32)


def _sum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros(np.shape(arrays[0]), np.float64)
    for a in arrays:
        total += a
    return total


# --------------------------------------------------------------------------------------------------
# Task arithmetic and TIES.


def task_arithmetic(x0: np.ndarray, xs: Sequence[np.ndarray], lam: float) -> np.ndarray:
    """``x0 + lam * sum_i (x_i - x0)`` (Ilharco et al. 2023); lam = 1/K is the uniform soup."""
    return _finish(x0, lam * _sum(_taus(x0, xs)))


def trim_top(tau: np.ndarray, density: float) -> np.ndarray:
    """Keeps the ``ceil(density * size)`` entries of largest ``|tau|`` and zeroes the rest.

    Ties in magnitude go to the earlier entry in C order (a stable sort), so the result is
    deterministic. ``density`` is in (0, 1]; 1 returns a copy of ``tau``. Same dtype as ``tau``.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    tau = np.asarray(tau)
    flat = tau.reshape(-1)
    # The product is rounded: 0.07 * 100 is 7.000000000000001, whose ceiling would keep 8 entries.
    k = min(flat.size, max(1, math.ceil(round(density * flat.size, 9))))  # at least one entry kept
    out = np.zeros_like(flat)
    if k:
        # The k-th largest magnitude by partition (linear time; a sort of every tensor made TIES 4x
        # slower than task arithmetic): everything above it is kept, and of the entries equal to it,
        # the earliest in index order fill the rest, as a stable sort would pick them.
        magnitude = np.abs(flat)
        threshold = np.partition(magnitude, flat.size - k)[flat.size - k]
        above = magnitude > threshold
        tied = np.flatnonzero(magnitude == threshold)[: k - int(above.sum())]
        out[above] = flat[above]
        out[tied] = flat[tied]
    return out.reshape(tau.shape)


def elect_sign(taus: Sequence[np.ndarray]) -> np.ndarray:
    """The sign (-1, 0 or +1) of ``sum_i taus_i`` per entry: TIES's election by total mass.

    The sum is float64, so cancelling float32 entries cannot flip the sign by rounding.
    """
    return np.sign(_sum([_f64(t) for t in taus]))


def disjoint_mean(taus: Sequence[np.ndarray], sign: np.ndarray) -> np.ndarray:
    """Per entry, the mean of the ``taus_i`` that are nonzero and have the sign ``sign``; 0 where none does.

    Trimmed (zero) entries do not count towards the mean: that is what makes it "disjoint", and why
    TIES scales this mean rather than a sum. Returns float64.
    """
    total = np.zeros(np.shape(sign), np.float64)
    count = np.zeros(np.shape(sign), np.int64)
    for tau in taus:
        tau = _f64(tau)
        agree = (tau != 0) & (np.sign(tau) == sign)
        total += np.where(agree, tau, 0.0)
        count += agree
    return total / np.maximum(count, 1)


def ties(x0: np.ndarray, xs: Sequence[np.ndarray], density: float, lam: float) -> np.ndarray:
    """TIES-merging (Yadav et al. 2023): ``x0 + lam * disjoint_mean(trimmed, elect_sign(trimmed))``.

    ``trimmed`` are the displacements each cut to its top ``density`` fraction (``trim_top``). lam
    scales a MEAN: lam = 1 keeps the agreed displacement's size (see the module docstring).
    """
    trimmed = [trim_top(t, density) for t in _taus(x0, xs)]
    return _finish(x0, lam * disjoint_mean(trimmed, elect_sign(trimmed)))


# --------------------------------------------------------------------------------------------------
# DARE.


def tensor_rng(seed: int, path: str, index: int) -> np.random.Generator:
    """The generator of DARE's mask for one tensor (``path``) of one ingredient (``index``).

    Seeded by (seed, crc32(path), index) rather than drawn from one shared stream, so that a mask does
    not depend on the order tensors are read in (or on which other tensors exist): the merge is a
    function of its seed alone. crc32, not ``hash``, because Python salts string hashes per process.
    """
    return np.random.default_rng([int(seed), zlib.crc32(path.encode()), int(index)])


def dare_drop(tau: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drops each entry of ``tau`` with probability ``p`` and rescales the kept ones by ``1 / (1 - p)``.

    The rescaling makes the result an unbiased estimate of ``tau``. ``p`` is in [0, 1); with ``p == 0``
    ``tau`` itself is returned (and ``rng`` is not used). Same dtype as ``tau``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"the drop probability p must be in [0, 1), got {p}")
    tau = np.asarray(tau)
    if p == 0:
        return tau
    keep = rng.random(tau.shape) >= p  # P(keep) = 1 - p
    return np.where(keep, tau / (1.0 - p), 0).astype(tau.dtype, copy=False)


def dare(
    x0: np.ndarray,
    xs: Sequence[np.ndarray],
    p: float,
    lam: float,
    rngs: Sequence[np.random.Generator],
    combine: str = "linear",
) -> np.ndarray:
    """DARE (Yu et al. 2024): each displacement through ``dare_drop`` with its own ``rngs[i]``, then

    * ``"linear"``: ``x0 + lam * sum_i dropped_i`` (task arithmetic's convention: lam = 1/K averages);
    * ``"ties"``: ``x0 + lam * disjoint_mean(dropped, elect_sign(dropped))`` (TIES's convention).
    """
    if combine not in ("linear", "ties"):
        raise ValueError(f"combine must be 'linear' or 'ties', got {combine!r}")
    if len(rngs) != len(xs):
        raise ValueError(f"{len(xs)} ingredients but {len(rngs)} generators")
    dropped = [dare_drop(t, p, rng) for t, rng in zip(_taus(x0, xs), rngs)]
    if combine == "linear":
        return _finish(x0, lam * _sum(dropped))
    return _finish(x0, lam * disjoint_mean(dropped, elect_sign(dropped)))


# --------------------------------------------------------------------------------------------------
# Spherical methods.


def _angle(u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """(cos, angle) between two unit vectors; the cosine clipped, as rounding can push it past 1."""
    c = float(np.clip(np.dot(u, v), -1.0, 1.0))
    return c, math.acos(c)


def slerp(x0: np.ndarray, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) of their displacements from ``x0``.

    With ta = a - x0, tb = b - x0 (flattened) and W the angle between them, the result is
    ``x0 + sin((1-t) W)/sin W * ta + sin(t W)/sin W * tb``. Where ``|cos W| > 0.9995`` (nearly parallel or
    antiparallel displacements, mergekit's threshold) or either displacement is zero, it is the linear
    ``x0 + (1-t) ta + t tb``. The
    endpoints are special-cased, so t = 0 gives ``a`` and t = 1 gives ``b`` bit for bit.
    """
    if np.shape(a) != np.shape(x0) or np.shape(b) != np.shape(x0):
        raise ValueError(f"slerp needs equal shapes, got {np.shape(x0)}, {np.shape(a)}, {np.shape(b)}")
    if t == 0:
        return np.array(a, dtype=np.float32)
    if t == 1:
        return np.array(b, dtype=np.float32)
    ta, tb = _taus(x0, [a, b])
    na, nb = float(np.linalg.norm(ta)), float(np.linalg.norm(tb))
    if na > 0 and nb > 0:
        c, omega = _angle(ta.reshape(-1) / na, tb.reshape(-1) / nb)
        if abs(c) <= _PARALLEL_COS:
            s = math.sin(omega)
            return _finish(x0, math.sin((1 - t) * omega) / s * ta + math.sin(t * omega) / s * tb)
    return _finish(x0, (1 - t) * ta + t * tb)


def _log_map(m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The sphere's log map at ``m`` of ``u`` (both unit): the tangent vector of length angle(m, u)."""
    c, theta = _angle(m, u)
    s = math.sin(theta)
    if s < 1e-12:
        # theta ~ 0: u is m, no pull. theta ~ pi: every direction is a geodesic to u, none is
        # preferred, so u pulls nowhere rather than along an arbitrary one.
        return np.zeros_like(m)
    # theta / sin(theta) stays near 1 for small theta, so noise in acos there does not matter.
    return (theta / s) * (u - c * m)


def spherical_mean(
    x0: np.ndarray, xs: Sequence[np.ndarray], *, max_iter: int = 50, tol: float = 1e-10
) -> np.ndarray:
    """The Karcher mean of the displacements' directions, at their mean length: ``x0 + length * m``.

    ``m`` is the Karcher (Frechet) mean on the unit sphere of u_i = tau_i / |tau_i| (zero displacements
    have no direction and are left out), found by the fixed-point iteration
    ``m <- normalize(m + mean_i log_m(u_i))`` from the normalised Euclidean mean of the u_i, until the
    step's norm is below ``tol`` or after ``max_iter`` steps. ``length`` is the mean of |tau_i| over all
    K (zeros included, as they would shrink a soup). All displacements zero: ``x0``. Where the u_i sum
    to zero (e.g. two opposite directions) the mean is not unique; the iteration then starts from u_1.
    For two displacements of equal norm this is ``slerp(x0, x1, x2, 0.5)``.
    """
    taus = _taus(x0, xs)
    norms = [float(np.linalg.norm(t)) for t in taus]
    length = sum(norms) / len(taus)
    dirs = [t.reshape(-1) / n for t, n in zip(taus, norms) if n > 0]
    if not dirs:
        return np.array(x0, dtype=np.float32)
    m = _sum(dirs)
    m_norm = float(np.linalg.norm(m))
    m = m / m_norm if m_norm > 1e-12 else dirs[0].copy()
    for _ in range(max_iter):
        step = _sum([_log_map(m, u) for u in dirs]) / len(dirs)
        # step is tangent (orthogonal to m), so |m + step| >= 1: the normalisation never divides by 0.
        m = m + step
        m /= np.linalg.norm(m)
        if float(np.linalg.norm(step)) < tol:
            break
    return _finish(x0, (length * m).reshape(np.shape(x0)))


# --------------------------------------------------------------------------------------------------
# Model Stock.


def model_stock_ratio(taus: Sequence[np.ndarray]) -> float:
    """Model Stock's interpolation ratio t = K cos / (1 + (K - 1) cos) (Jang et al. 2024).

    cos is the mean over pairs i < j of the cosine between tau_i and tau_j, for one tensor (the paper's
    "layer"). K = 1 gives 1.0 (the ingredient itself). A zero displacement has no direction, so its
    pairs are left out; with no pair left, 1.0 (the plain mean). cos <= 0 gives 0.0, the init: the
    ingredients disagree completely, which the formula maps to t <= 0.
    """
    k = len(taus)
    if k == 0:
        raise ValueError("model_stock_ratio needs at least one displacement")
    if k == 1:
        return 1.0
    units = []
    for tau in taus:
        flat = _f64(tau).reshape(-1)
        n = float(np.linalg.norm(flat))
        units.append(flat / n if n > 0 else None)
    cosines = [float(np.clip(np.dot(units[i], units[j]), -1.0, 1.0))
               for i in range(k) for j in range(i + 1, k)
               if units[i] is not None and units[j] is not None]
    if not cosines:
        return 1.0
    c = sum(cosines) / len(cosines)
    if c <= 0:
        return 0.0
    return k * c / (1 + (k - 1) * c)


def model_stock_with_ratio(x0: np.ndarray, xs: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """``model_stock`` and the ratio t it used (the report shows the ratios)."""
    taus = _taus(x0, xs)
    t = model_stock_ratio(taus)
    return _finish(x0, t * (_sum(taus) / len(taus))), t


def model_stock(x0: np.ndarray, xs: Sequence[np.ndarray]) -> np.ndarray:
    """Model Stock: ``x0 + t * mean_i tau_i`` (= t * mean theta_i + (1 - t) theta_0), t from ``model_stock_ratio``."""
    return model_stock_with_ratio(x0, xs)[0]


# --------------------------------------------------------------------------------------------------
# The per-tensor function of each method, as ``merge_by_tensor`` takes it.

Combine = Callable[[str, np.ndarray, list[np.ndarray]], np.ndarray]


def statistics_rule(method: str, **hyperparameters: Any) -> Callable[[str, list[np.ndarray]], np.ndarray] | None:
    """How ``method`` combines what is no displacement (BatchNorm statistics): ``merge_by_tensor``'s
    ``unmerged``, shared by the recipes and ``soupjax.api.merge``. SLERP takes the two ends' in the
    proportion of t, so that t = 0 is the first ingredient and t = 1 the second, statistics included
    ((1 - t) a + t b is a or b exactly there); the others their plain mean (None)."""
    if method == "slerp":
        t = hyperparameters["t"]
        return lambda path, xs: (1 - t) * xs[0] + t * xs[1]
    return None


# --------------------------------------------------------------------------------------------------
# Whole models, one tensor at a time.


def _name(source: Any, default: str) -> str:
    name = getattr(source, "name", None)
    return str(name) if name else default


def _plain_mean(xs: Sequence[np.ndarray]) -> np.ndarray:
    """The float32 mean, as the uniform soup computes it: the first plus the mean displacement from it,
    so K copies of one tensor give that tensor exactly (a plain sum / K can round away from it)."""
    ref = xs[0].astype(np.float32)
    acc = np.zeros_like(ref)
    for x in xs[1:]:
        acc += x.astype(np.float32) - ref
    return ref + acc / np.float32(len(xs))


def merge_by_tensor(
    init: TensorSource,
    sources: Sequence[TensorSource],
    combine: Callable[[str, np.ndarray, list[np.ndarray]], np.ndarray],
    *,
    merged_collections: Sequence[str] = ("params",),
    unmerged: Callable[[str, list[np.ndarray]], np.ndarray] | None = None,
    threads: int | None = None,
    prefetch_bytes: int | None = None,
) -> dict:
    """Merges whole models tensor by tensor: ``combine(path, x0, xs)`` on each merged tensor.

    For each leaf of ``sources[0].structure`` (named as ``trees.path_str`` names it, e.g.
    ``params/head/kernel``): a floating-point leaf in a collection named in ``merged_collections`` (the
    path's first component) is read from ``init`` and from every source, converted to float32, given to
    ``combine`` (e.g. ``lambda path, x0, xs: ties(x0, xs, 0.2, 1.0)``) and cast back to the first
    source's stored dtype. Every other leaf (BatchNorm ``batch_stats``, integer counters) is the plain
    float32 mean of the sources, integers rounded, and the init is not read for it: statistics are
    not displacements from the init (``soup --recalibrate_bn`` recomputes them anyway). ``unmerged(path,
    xs)`` replaces that mean where a method weighs its sources unequally (SLERP: the two ends' statistics
    in the proportion of t).

    Before anything is read, the init and every source are checked to have the same paths and
    shapes as the first source: a ValueError names the source (its ``name``, else "ingredient i" or
    "the init"), the parameter and both shapes. The tensors are read by the per-tensor engine
    (``engine.by_tensor``: ``threads`` reads run ahead of the arithmetic within ``prefetch_bytes``), the
    one the per-tensor soups use. Memory: one tensor of each of the K + 1 models at a time plus the
    reads ahead (and ``combine``'s working copies of that tensor), never a whole second model besides
    the result. Returns a tree of numpy arrays with the sources' structure.
    """
    if not sources:
        raise ValueError("a merge needs at least one ingredient")
    names = [_name(s, f"ingredient {i}") for i, s in enumerate(sources)]
    init_name = _name(init, "the init")
    layouts = [source_layout(src, name) for src, name in zip(sources, names)]
    layout, ref = layouts[0], names[0]
    layout.check(source_layout(init, init_name), init_name, ref)
    for other, name in zip(layouts[1:], names[1:]):
        layout.check(other, name, ref)
    init_dtypes = source_layout(init, init_name).dtypes
    merged = [path.split("/", 1)[0] in set(merged_collections) and jnp.issubdtype(dtype, jnp.floating)
              for path, dtype in zip(layout.paths, layout.dtypes)]
    # Every read fresh: the reduce holds all K (+ 1) tensors of a leaf at once, so no read may go into a
    # buffer that the engine reuses for the next one.
    plan = [[Read(src, name, other.dtypes[j], True) for src, name, other in zip(sources, names, layouts)]
            + ([Read(init, init_name, init_dtypes[j], True)] if merged[j] else [])
            for j in range(len(layout.paths))]
    f32 = np.dtype(np.float32)

    def as_f32(x: np.ndarray, kind: str) -> np.ndarray:
        # A fresh float32 read is the merge's own: no copy. Anything else is copied, so that ``combine``
        # may not change a source's own array.
        return x if kind == FRESH and x.dtype == f32 else x.astype(f32)

    def reduce(j: int, reads: Any) -> np.ndarray:
        read = list(reads)
        path = layout.paths[j]
        if merged[j]:
            x0 = as_f32(*read[-1])
            return combine(path, x0, [as_f32(x, kind) for x, kind in read[:-1]])
        xs = [x for x, _ in read]
        return _plain_mean(xs) if unmerged is None else unmerged(path, [x.astype(f32) for x in xs])

    return engine.by_tensor(layout, plan, reduce, threads=threads, prefetch_bytes=prefetch_bytes)
