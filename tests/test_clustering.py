"""Tests of target prototypes by K-Means and the Eq. 7 distance (BiSMAP Sec. 3.4)."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

from bismap.stm import clustering
from bismap.stm.clustering import PrototypeSearch, kmeans, kmeans_on_gpu, nearest_distance, search_backend


def _blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(4, 8))
    return (centres[rng.integers(0, 4, size=2000)] + rng.normal(size=(2000, 8))).astype(np.float32)  # (N, D)


def test_kmeans_deterministic_for_seed() -> None:
    embeddings = _blobs()
    first = kmeans(embeddings, 6, seed=3, iterations=10, device="cpu")
    second = kmeans(embeddings, 6, seed=3, iterations=10, device="cpu")
    other = kmeans(embeddings, 6, seed=4, iterations=10, device="cpu")
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


@pytest.fixture
def fresh_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the once-per-process fallback lines again."""
    monkeypatch.setattr(clustering, "_REPORTED", set())


def test_torch_search_agrees_with_faiss() -> None:
    rng = np.random.default_rng(7)
    embeddings = rng.normal(size=(1000, 32)).astype(np.float32)  # (N, D)
    centroids = rng.normal(size=(40, 32)).astype(np.float32)  # (J, D)
    faiss_distances, faiss_indices = PrototypeSearch(centroids, "cpu").search(embeddings)
    search = PrototypeSearch(centroids, "cpu", backend="torch", chunk_rows=300)  # 4 chunks, the last partial
    torch_distances, torch_indices = search.search(torch.from_numpy(embeddings))
    assert search.backend == "torch" and torch_distances.dtype == np.float32 and torch_indices.dtype == np.int64
    np.testing.assert_array_equal(torch_indices, faiss_indices)
    np.testing.assert_allclose(torch_distances, faiss_distances, rtol=1e-4, atol=1e-4)
    assert torch_distances.shape == (1000,) and torch_distances.min() > 0.5  # not trivially zero
    with pytest.raises(ValueError):
        search.search(torch.from_numpy(embeddings[:, :8]))


def test_backend_follows_job_device_and_faiss_build(fresh_log_lines, caplog: pytest.LogCaptureFixture) -> None:
    cuda = torch.device("cuda", 0)
    assert search_backend("cpu", gpu_support=True) == "faiss-cpu"
    assert search_backend(cuda, gpu_support=True) == "faiss-gpu"
    assert not kmeans_on_gpu(None, gpu_support=True) and kmeans_on_gpu(cuda, gpu_support=True)
    assert caplog.records == []  # nothing to explain
    with caplog.at_level(logging.INFO, logger="bismap.stm.clustering"):
        for _ in range(3):  # e.g. once per image: still one line each
            assert search_backend(cuda, gpu_support=False) == "torch"
            assert kmeans_on_gpu(cuda, gpu_support=False) is False
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    if not hasattr(faiss, "StandardGpuResources"):  # this machine's faiss-cpu
        assert messages[0] == "faiss has no GPU support (faiss-cpu installed): " \
            "nearest-prototype search by torch on cuda:0 (exact, chunked)"
        assert messages[1] == "faiss has no GPU support (faiss-cpu installed): K-Means on the CPU"


def test_kmeans_on_a_cuda_job_without_gpu_faiss_falls_back_to_the_cpu(
        fresh_log_lines, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(clustering, "faiss_gpu_support", lambda: False)  # as faiss-cpu, whatever is installed
    embeddings = _blobs(2)
    expected = kmeans(embeddings, 4, seed=1, iterations=5, device="cpu")
    with caplog.at_level(logging.WARNING, logger="bismap.stm.clustering"):
        first = kmeans(embeddings, 4, seed=1, iterations=5, device="cuda")  # never touches CUDA
        second = kmeans(embeddings, 4, seed=1, iterations=5, device=torch.device("cuda", 0))
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(": K-Means on the CPU"), warnings


def test_faiss_build_names_the_installed_build() -> None:
    description = clustering.faiss_build()
    assert faiss.__version__ in description
    assert ("GPU build" in description) == hasattr(faiss, "StandardGpuResources")
