"""Target prototypes by K-Means, and the distance of Eq. 7 (BiSMAP Sec. 3.4).

BiSMAP clusters target features of a third-party encoder \\hat{E} with K-Means
and keeps the J cluster centres {A_j} as target prototypes. The distance of a
source feature to the target domain is the Euclidean distance to the nearest
prototype (Eq. 7)::

    D(x^s)_i = min_j || \\hat{f}_i^s - A_j ||_2                          (Eq. 7)

Both steps use FAISS (``faiss.Kmeans`` and ``faiss.IndexFlatL2``). FAISS's
K-Means is deterministic for a fixed seed on a given machine and thread count;
the seed also fixes its sub-sampling (``max_points_per_centroid``).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

__all__ = ["gpu_available", "kmeans", "nearest_distance"]

logger = logging.getLogger(__name__)


def gpu_available() -> bool:
    """True when the installed FAISS build reports at least one GPU (never for faiss-cpu)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus is not None and get_num_gpus() > 0)


def _as_float32_matrix(array: np.ndarray, name: str) -> np.ndarray:
    """C-contiguous float32 (N, D) copy-if-needed of ``array``; raises on other ranks or non-finite values."""
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains non-finite values")
    return matrix


def kmeans(embeddings: np.ndarray, clusters: int, seed: int, iterations: int = 20,
           use_gpu: bool | None = None) -> np.ndarray:
    """Cluster target features with K-Means; return the J target prototypes {A_j} (BiSMAP Sec. 3.4).

    embeddings: (N, D) features; clusters: J; seed: FAISS seed (initialisation
    and sub-sampling); iterations: Lloyd iterations; use_gpu: None = GPU when
    FAISS reports one. Returns float32 centroids (J, D).
    """
    matrix = _as_float32_matrix(embeddings, "embeddings")  # (N, D)
    if clusters < 1 or clusters > matrix.shape[0]:
        raise ValueError(f"clusters must be in [1, N={matrix.shape[0]}], got {clusters}")
    gpu = gpu_available() if use_gpu is None else use_gpu
    if gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but FAISS reports no GPU (faiss-cpu build?)")
    model = faiss.Kmeans(matrix.shape[1], clusters, niter=iterations, seed=seed, gpu=gpu, verbose=False)
    model.train(matrix)
    centroids = np.array(model.centroids, dtype=np.float32).reshape(clusters, matrix.shape[1])  # (J, D)
    logger.info("k-means: %d points, %d dims, %d clusters, %d iterations, gpu=%s, objective %.6g",
                matrix.shape[0], matrix.shape[1], clusters, iterations, gpu, float(model.obj[-1]))
    return centroids


def nearest_distance(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """BiSMAP Eq. 7: Euclidean distance of every row to its nearest centroid, float32 (N,).

    Exact search with ``faiss.IndexFlatL2`` (squared distances), then the
    square root; tiny negative round-off is clamped to 0.
    """
    matrix = _as_float32_matrix(embeddings, "embeddings")  # (N, D)
    prototypes = _as_float32_matrix(centroids, "centroids")  # (J, D)
    if matrix.shape[1] != prototypes.shape[1]:
        raise ValueError(f"dimension mismatch: embeddings {matrix.shape[1]}, centroids {prototypes.shape[1]}")
    index = faiss.IndexFlatL2(prototypes.shape[1])
    index.add(prototypes)
    squared, _ = index.search(matrix, 1)  # (N, 1)
    return np.sqrt(np.maximum(squared[:, 0], 0.0)).astype(np.float32)  # (N,)
