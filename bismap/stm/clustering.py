"""Target prototypes by K-Means, and the distance of Eq. 7 (BiSMAP Sec. 3.4).

BiSMAP clusters target features of a third-party encoder \\hat{E} with K-Means
and keeps the J cluster centres {A_j} as target prototypes. The distance of a
source feature to the target domain is the Euclidean distance to the nearest
prototype (Eq. 7)::

    D(x^s)_i = min_j || \\hat{f}_i^s - A_j ||_2                          (Eq. 7)

Both steps use FAISS (``faiss.Kmeans`` and an exact flat L2 index). FAISS's
K-Means is deterministic for a fixed seed on a given machine and thread count;
the seed also fixes its sub-sampling (``max_points_per_centroid``).

Where they run follows the job's device (what :func:`bismap.devices.acquire_devices`
gave it) and the installed FAISS build:

============================  ==================  ===============================
job device                    K-Means             nearest-prototype search
============================  ==================  ===============================
CUDA, FAISS with GPU support  FAISS on that GPU   FAISS ``GpuIndexFlatL2`` there
CUDA, faiss-cpu               FAISS on the CPU    torch on that GPU (exact, chunked)
CPU                           FAISS on the CPU    FAISS ``IndexFlatL2``
============================  ==================  ===============================

A fallback is logged once per process, with its reason. ``faiss-cpu`` and a
GPU build (``faiss-gpu``, ``faiss-gpu-cu12``) both install the module
``faiss``; see the README ("Running at scale") for installing the GPU one.
"""

from __future__ import annotations

import importlib.metadata
import logging

import faiss
import numpy as np
import torch

__all__ = ["PrototypeSearch", "faiss_build", "faiss_gpu_support", "gpu_available", "kmeans", "kmeans_on_gpu",
           "nearest_distance", "search_backend"]

logger = logging.getLogger(__name__)

SEARCH_BACKENDS = ("faiss-gpu", "torch", "faiss-cpu")
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu-cuvs")
_REPORTED: set[str] = set()  # log lines already written by this process


def faiss_gpu_support() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU (never for faiss-cpu)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus is not None and get_num_gpus() > 0)


gpu_available = faiss_gpu_support  # the name earlier code used


def faiss_build() -> str:
    """Which distributions provide ``faiss`` (e.g. ``'faiss-cpu 1.15.1'``) and whether it has GPU classes."""
    installed = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    kind = "GPU build" if hasattr(faiss, "StandardGpuResources") else "CPU-only build"
    return f"{', '.join(installed) or 'faiss (no distribution metadata)'}: {kind}, faiss {faiss.__version__}"


def _no_gpu_reason() -> str:
    if not hasattr(faiss, "StandardGpuResources"):
        return "faiss has no GPU support (faiss-cpu installed)"
    return "faiss is a GPU build but sees no GPU (faiss.get_num_gpus() == 0)"


def _log_once(level: int, message: str, *arguments: object) -> None:
    """One log line per distinct message in this process (a job calls these per image)."""
    text = message % arguments if arguments else message
    if text not in _REPORTED:
        _REPORTED.add(text)
        logger.log(level, text)


def kmeans_on_gpu(device: torch.device | str | None, gpu_support: bool) -> bool:
    """FAISS K-Means on the job's GPU? Only for a CUDA device with GPU FAISS; else one log line why not."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return False
    if not gpu_support:
        _log_once(logging.WARNING, "%s: K-Means on the CPU", _no_gpu_reason())
    return gpu_support


def search_backend(device: torch.device | str | None, gpu_support: bool) -> str:
    """The nearest-prototype search for the job's device: one of SEARCH_BACKENDS (table of the docstring)."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return "faiss-cpu"
    if gpu_support:
        return "faiss-gpu"
    _log_once(logging.INFO, "%s: nearest-prototype search by torch on %s (exact, chunked)", _no_gpu_reason(), device)
    return "torch"


def _as_float32_matrix(array: np.ndarray, name: str) -> np.ndarray:
    """C-contiguous float32 (N, D) copy-if-needed of ``array``; raises on other ranks or non-finite values."""
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains non-finite values")
    return matrix


def _gpu_index(dim: int, device: torch.device) -> tuple[faiss.Index, object]:
    """An exact L2 FAISS index on ``device`` and its GPU resources (keep both alive together)."""
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, device.index or 0, faiss.IndexFlatL2(dim)), resources


def kmeans(embeddings: np.ndarray, clusters: int, seed: int, iterations: int = 20,
           device: torch.device | str | None = None) -> np.ndarray:
    """Cluster target features with K-Means; return the J target prototypes {A_j} (BiSMAP Sec. 3.4).

    embeddings: (N, D) features; clusters: J; seed: FAISS seed (initialisation
    and sub-sampling); iterations: Lloyd iterations; device: the job's device
    (GPU K-Means on a CUDA device when FAISS has GPU support, else the CPU and
    one log line why). Returns float32 centroids (J, D).
    """
    matrix = _as_float32_matrix(embeddings, "embeddings")  # (N, D)
    if clusters < 1 or clusters > matrix.shape[0]:
        raise ValueError(f"clusters must be in [1, N={matrix.shape[0]}], got {clusters}")
    on_gpu = kmeans_on_gpu(device, faiss_gpu_support())
    model = faiss.Kmeans(matrix.shape[1], clusters, niter=iterations, seed=seed, verbose=False)
    if on_gpu:  # the index on the job's GPU; its resources live as long as the model
        model.index, model.gpu_resources = _gpu_index(matrix.shape[1], torch.device(device))
    model.train(matrix)
    centroids = np.array(model.centroids, dtype=np.float32).reshape(clusters, matrix.shape[1])  # (J, D)
    logger.info("k-means: %d points, %d dims, %d clusters, %d iterations, on %s, objective %.6g",
                matrix.shape[0], matrix.shape[1], clusters, iterations, device if on_gpu else "cpu",
                float(model.obj[-1]))
    return centroids


class PrototypeSearch:
    """Exact nearest prototype (BiSMAP Eq. 7) of many rows, built once per job on its device.

    ``backend`` None picks by :func:`search_backend`; "torch" on a CPU device is
    for tests (it must agree with FAISS). ``search`` takes (n, D) rows as a
    tensor on any device or an array, and returns numpy distances (n,) float32
    and indices (n,) int64.
    """

    def __init__(self, centroids: np.ndarray, device: torch.device | str | None = None,
                 backend: str | None = None, chunk_rows: int = 65_536) -> None:
        self.centroids = _as_float32_matrix(centroids, "centroids")  # (J, D)
        self.device = torch.device(device or "cpu")
        self.backend = backend or search_backend(self.device, faiss_gpu_support())
        if self.backend not in SEARCH_BACKENDS:
            raise ValueError(f"backend must be one of {SEARCH_BACKENDS}, got '{self.backend}'")
        self.chunk_rows = chunk_rows
        self._resources = None
        if self.backend == "torch":
            self._prototypes = torch.from_numpy(self.centroids).to(self.device)  # (J, D)
            self._squared_norms = (self._prototypes * self._prototypes).sum(dim=1)  # (J,)
        elif self.backend == "faiss-gpu":
            self._index, self._resources = _gpu_index(self.centroids.shape[1], self.device)
            self._index.add(self.centroids)
        else:
            self._index = faiss.IndexFlatL2(self.centroids.shape[1])
            self._index.add(self.centroids)

    def search(self, rows: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if rows.ndim != 2 or rows.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"dimension mismatch: rows {tuple(rows.shape)}, centroids {self.centroids.shape}")
        if self.backend == "torch":
            return self._torch_search(torch.as_tensor(rows))
        matrix = rows.detach().float().cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        squared, indices = self._index.search(_as_float32_matrix(matrix, "embeddings"), 1)  # (n, 1) each
        return np.sqrt(np.maximum(squared[:, 0], 0.0)).astype(np.float32), indices[:, 0].astype(np.int64)

    def distances(self, rows: torch.Tensor | np.ndarray) -> np.ndarray:
        """Eq. 7: the distance of every row to its nearest prototype, float32 (n,)."""
        return self.search(rows)[0]

    @torch.no_grad()
    def _torch_search(self, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """||x||^2 - 2 x.A + ||A||^2 in float32 chunks, as FAISS's flat index computes it."""
        distances, indices = [], []
        for chunk in rows.to(self.device, torch.float32).split(self.chunk_rows):  # (n, D)
            if not torch.isfinite(chunk).all():
                raise ValueError("embeddings contains non-finite values")
            squared = torch.addmm(self._squared_norms, chunk, self._prototypes.T, alpha=-2.0)  # (n, J)
            nearest, index = squared.min(dim=1)  # (n,), (n,)
            nearest = (nearest + (chunk * chunk).sum(dim=1)).clamp_min(0.0).sqrt()
            distances.append(nearest.cpu())
            indices.append(index.cpu())
        if not distances:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return torch.cat(distances).numpy(), torch.cat(indices).numpy().astype(np.int64)


def nearest_distance(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """BiSMAP Eq. 7 on the CPU: Euclidean distance of every row to its nearest centroid, float32 (N,).

    Exact search with ``faiss.IndexFlatL2`` (squared distances), then the
    square root; tiny negative round-off is clamped to 0.
    """
    return PrototypeSearch(centroids, "cpu").distances(_as_float32_matrix(embeddings, "embeddings"))
