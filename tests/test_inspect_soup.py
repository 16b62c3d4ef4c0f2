"""The geometry of inspect_soup: angles and distances of fine-tuning displacements, exact for ingredients
that are large vectors a tiny distance apart (as fine-tuned models are)."""
from __future__ import annotations

import numpy as np

from soupjax.inspect_soup import displacement_geometry


def _reference(vectors: np.ndarray, theta0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles (degrees) between displacements and L2 distances, directly in float64."""
    v = vectors.astype(np.float64)
    d = v - theta0.astype(np.float64)
    norms = np.linalg.norm(d, axis=1)
    angles = np.degrees(np.arccos(np.clip((d @ d.T) / np.outer(norms, norms), -1.0, 1.0)))
    np.fill_diagonal(angles, 0.0)
    return angles, np.linalg.norm(v[:, None] - v[None], axis=-1)


def test_geometry_of_large_parameters_with_tiny_displacements():
    rng = np.random.default_rng(0)
    p = 20_000
    theta0 = (10.0 + rng.normal(size=p)).astype(np.float32)  # |theta| ~ 1,400
    shared = 1e-3 * rng.normal(size=p)  # the ingredients share most of their displacement
    vectors = np.stack([theta0 + shared + 1e-4 * rng.normal(size=p) for _ in range(4)]).astype(np.float32)
    want_angles, want_l2 = _reference(vectors, theta0)
    assert 0.01 < want_l2[0, 1] < 0.03  # |a|^2 + |b|^2 - 2ab of float32 vectors of norm 1,400: all noise

    angles, l2 = displacement_geometry(vectors - theta0)

    np.testing.assert_allclose(l2, want_l2, rtol=1e-4)
    np.testing.assert_allclose(angles, want_angles, atol=1e-3)
    assert np.all(np.diag(l2) == 0) and np.all(np.diag(angles) == 0)


def test_geometry_of_simple_displacements():
    d = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)
    angles, l2 = displacement_geometry(d)
    np.testing.assert_allclose(angles[0, 1], 90.0, atol=1e-6)
    np.testing.assert_allclose(angles[0, 2], 45.0, atol=1e-6)
    np.testing.assert_allclose(l2[0, 1], np.sqrt(5.0), rtol=1e-12)
    np.testing.assert_allclose(l2, l2.T)
