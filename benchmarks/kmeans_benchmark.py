"""Benchmark the STM's FAISS K-Means (target prototypes, BiSMAP Sec. 3.4) against scikit-learn's KMeans.

Run from the repository root::

    python benchmarks/kmeans_benchmark.py --embeddings results/digits/stm/target_embeddings.h5 --clusters 16
    python benchmarks/kmeans_benchmark.py                # synthetic, paper-like: 47,600 x 4,096, J = 40
    python benchmarks/kmeans_benchmark.py --rows 20000 --dim 512 --threads 1

One run of each, on the same embeddings, same J, same number of Lloyd
iterations (scikit-learn with ``tol=0`` so that it does not stop earlier):

* ``bismap.stm.clustering.kmeans`` as the ``target_prototypes`` rule runs it:
  FAISS trains on a random subset of 256 points per centre (its default);
* FAISS on all points (``max_points_per_centroid`` raised), the same work as
  scikit-learn;
* ``sklearn.cluster.KMeans(n_init=1, algorithm='lloyd')`` with k-means++ seeding.

Inertia (sum of squared distances of ALL rows to their nearest centre) is
computed the same way for the three, with FAISS exact search. The synthetic
default mimics Cityscapes train (2,975 images x 16 sampled pixels) in the
4,096-d space of a 2x SimCLRv2 ResNet-152.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from bismap.stm.clustering import kmeans, nearest_distance
from bismap.stm.target import read_target_embeddings


def synthetic_embeddings(rows: int, dim: int, modes: int, seed: int) -> np.ndarray:
    """Non-negative (post-ReLU-like) clustered rows: (rows, dim) float32."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(0.0, 1.0, (modes, dim)))  # (M, D)
    members = rng.integers(modes, size=rows)  # (N,)
    noise = rng.normal(0.0, 0.5, (rows, dim))  # (N, D)
    return np.maximum(centres[members] + noise, 0.0).astype(np.float32)


def faiss_all_points(embeddings: np.ndarray, clusters: int, seed: int, iterations: int) -> np.ndarray:
    """FAISS K-Means trained on every row (no sub-sampling): (J, D)."""
    model = faiss.Kmeans(embeddings.shape[1], clusters, niter=iterations, seed=seed, verbose=False,
                         max_points_per_centroid=embeddings.shape[0] // clusters + 1)
    model.train(embeddings)
    return np.asarray(model.centroids, dtype=np.float32)


def sklearn_kmeans(embeddings: np.ndarray, clusters: int, seed: int, iterations: int) -> np.ndarray:
    model = KMeans(clusters, init="k-means++", n_init=1, max_iter=iterations, tol=0.0, random_state=seed,
                   algorithm="lloyd")
    return model.fit(embeddings).cluster_centers_.astype(np.float32)


def timed(function: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def inertia(embeddings: np.ndarray, centroids: np.ndarray) -> float:
    distances = nearest_distance(embeddings, centroids).astype(np.float64)  # (N,), Eq. 7
    return float((distances ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", help="a target embeddings HDF5 (rule extract_target_embeddings)")
    parser.add_argument("--rows", type=int, default=47_600, help="synthetic rows when no file is given")
    parser.add_argument("--dim", type=int, default=4096, help="synthetic dimension when no file is given")
    parser.add_argument("--clusters", type=int, default=40, help="J")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="same thread count for FAISS and scikit-learn")
    arguments = parser.parse_args()
    if arguments.embeddings:
        embeddings, source = read_target_embeddings(arguments.embeddings), arguments.embeddings
    else:
        embeddings = synthetic_embeddings(arguments.rows, arguments.dim, 2 * arguments.clusters, arguments.seed)
        source = "synthetic"
    threads = arguments.threads or faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    j, iterations, seed = arguments.clusters, arguments.iterations, arguments.seed
    print(f"embeddings: {source}, {embeddings.shape[0]} x {embeddings.shape[1]}; J = {j}, "
          f"{iterations} iterations, {threads} thread(s)")
    runs = [("FAISS, bismap.stm.clustering.kmeans", min(len(embeddings), 256 * j),
             lambda: kmeans(embeddings, j, seed, iterations, device="cpu")),
            ("FAISS, all points", len(embeddings), lambda: faiss_all_points(embeddings, j, seed, iterations)),
            ("scikit-learn KMeans (lloyd, k-means++)", len(embeddings),
             lambda: sklearn_kmeans(embeddings, j, seed, iterations))]
    print(f"{'method':<40} {'trained on':>10} {'time [s]':>9} {'inertia (all rows)':>19}")
    with threadpool_limits(limits=threads):
        for name, trained_on, run in runs:
            centroids, seconds = timed(run)
            print(f"{name:<40} {trained_on:>10} {seconds:>9.2f} {inertia(embeddings, centroids):>19.6g}")


if __name__ == "__main__":
    main()
