"""Tests of target prototypes by K-Means and the Eq. 7 distance (BiSMAP Sec. 3.4)."""

from __future__ import annotations

import numpy as np
import pytest

from bismap.clustering import kmeans, nearest_distance


def _blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(4, 8))
    return (centres[rng.integers(0, 4, size=2000)] + rng.normal(size=(2000, 8))).astype(np.float32)  # (N, D)


def test_kmeans_deterministic_for_seed() -> None:
    embeddings = _blobs()
    first = kmeans(embeddings, 6, seed=3, iterations=10, use_gpu=False)
    second = kmeans(embeddings, 6, seed=3, iterations=10, use_gpu=False)
    other = kmeans(embeddings, 6, seed=4, iterations=10, use_gpu=False)
    assert first.shape == (6, 8) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_kmeans_finds_blob_centres() -> None:
    embeddings = _blobs(1)
    centroids = kmeans(embeddings, 4, seed=0, iterations=20)
    # every point within a few noise std of its nearest centroid (sqrt(8) ~ 2.8 expected)
    assert np.median(nearest_distance(embeddings, centroids)) < 4.0


def test_kmeans_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        kmeans(np.zeros((3, 2), dtype=np.float32), 4, seed=0)
    with pytest.raises(ValueError):
        kmeans(np.zeros(5, dtype=np.float32), 1, seed=0)


def test_nearest_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    embeddings = rng.normal(size=(300, 16)).astype(np.float32)  # (N, D)
    centroids = rng.normal(size=(7, 16)).astype(np.float32)  # (J, D)
    brute = np.sqrt(((embeddings[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)).min(axis=1)
    distances = nearest_distance(embeddings, centroids)
    assert distances.shape == (300,) and distances.dtype == np.float32
    np.testing.assert_allclose(distances, brute, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nearest_distance(centroids, centroids), np.zeros(7), atol=1e-3)
    with pytest.raises(ValueError):
        nearest_distance(embeddings, centroids[:, :4])
