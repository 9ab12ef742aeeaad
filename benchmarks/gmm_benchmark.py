"""Benchmark bismap's torch GMM against scikit-learn: MAPs scoring throughput and EM fit time.

Run from the repository root::

    python benchmarks/gmm_benchmark.py            # 19 classes, K=8, D=256, 200k pixels; fit on 300k x 256
    python benchmarks/gmm_benchmark.py --quick    # smaller sizes, a few seconds
    python benchmarks/gmm_benchmark.py --threads 1  # same thread count for both (shared machines)

(1) Scoring: ``ClassPrototypes.log_densities`` + argmax (all classes in one
matrix product per chunk) against scikit-learn's ``score_samples`` called class
by class on models built from the SAME parameters. (2) Fitting: ``fit_gmm``
against ``sklearn.mixture.GaussianMixture(covariance_type='diag',
init_params='kmeans')`` on synthetic clustered features. CUDA timings are added
when a GPU is visible.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.mixture import GaussianMixture as SklearnMixture
from threadpoolctl import threadpool_limits

from bismap.labels.gmm import ClassPrototypes, GaussianMixture, fit_gmm


def random_prototypes(rng: np.random.Generator, classes: int, components: int, dim: int) -> ClassPrototypes:
    """Random diagonal mixtures, one per class, in a standardised-looking feature space."""
    mixtures = []
    for _ in range(classes):
        means = rng.normal(0, 1.0, (components, dim))  # (K, D)
        variances = rng.uniform(0.3, 1.5, (components, dim))  # (K, D)
        weights = rng.dirichlet(np.full(components, 5.0))  # (K,)
        mixtures.append(GaussianMixture(*(torch.from_numpy(array) for array in (weights, means)), "diag",
                                        variances=torch.from_numpy(variances)))
    return ClassPrototypes(tuple(f"class_{c}" for c in range(classes)), tuple(mixtures))


def sample_pixels(rng: np.random.Generator, prototypes: ClassPrototypes, pixels: int) -> np.ndarray:
    """Pixels drawn from the mixtures themselves (random class, then component): (N, D) float64."""
    classes = rng.integers(len(prototypes.mixtures), size=pixels)
    rows = np.empty((pixels, prototypes.mixtures[0].feature_dim))
    for class_id, mixture in enumerate(prototypes.mixtures):
        members = np.flatnonzero(classes == class_id)
        component = rng.choice(mixture.components, size=len(members), p=mixture.weights.numpy())
        noise = rng.normal(size=(len(members), rows.shape[1]))
        rows[members] = mixture.means.numpy()[component] + np.sqrt(mixture.variances.numpy()[component]) * noise
    return rows


def sklearn_models(prototypes: ClassPrototypes) -> list[SklearnMixture]:
    models = []
    for mixture in prototypes.mixtures:
        model = SklearnMixture(mixture.components, covariance_type="diag")
        model.weights_, model.means_ = mixture.weights.numpy(), mixture.means.numpy()
        model.covariances_ = mixture.variances.numpy()
        model.precisions_cholesky_ = 1.0 / np.sqrt(model.covariances_)
        models.append(model)
    return models


def best_time(function: Callable[[], object], repeats: int, synchronize: bool = False) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        if synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if synchronize:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def scoring_benchmark(arguments: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    prototypes = random_prototypes(rng, arguments.classes, arguments.components, arguments.dim)
    pixels = sample_pixels(rng, prototypes, arguments.pixels)  # (N, D)
    print(f"\n(1) scoring {arguments.pixels:,} pixels, {arguments.classes} classes, K={arguments.components}, "
          f"D={arguments.dim}, diag; torch threads {torch.get_num_threads()}")
    models = sklearn_models(prototypes)
    reference_time, reference = best_time(lambda: np.stack([m.score_samples(pixels) for m in models], 1),
                                          arguments.repeats)
    reference_labels = reference.argmax(1)
    print(f"  {'method':<34}{'seconds':>10}{'pixels/s':>14}{'speed-up':>10}{'labels equal':>14}{'max |dlog p|':>14}")
    print(f"  {'sklearn score_samples per class':<34}{reference_time:>10.3f}"
          f"{arguments.pixels / reference_time:>14,.0f}{1.0:>10.2f}{'-':>14}{'-':>14}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            features = torch.from_numpy(pixels).to(device=device, dtype=dtype)
            prototypes.log_densities(features[:1024])  # build the stacked parameters once
            def score() -> tuple[torch.Tensor, torch.Tensor]:
                densities = prototypes.log_densities(features)  # (N, C)
                return densities, densities.argmax(dim=1)
            seconds, (densities, labels) = best_time(score, arguments.repeats, synchronize=device == "cuda")
            agreement = float((labels.cpu().numpy() == reference_labels).mean())
            difference = float(np.abs(densities.cpu().double().numpy() - reference).max())
            name = f"bismap {device} {str(dtype).split('.')[-1]}"
            print(f"  {name:<34}{seconds:>10.3f}{arguments.pixels / seconds:>14,.0f}"
                  f"{reference_time / seconds:>10.2f}{agreement:>14.6f}{difference:>14.2e}")
    print(f"  log-density range of the reference: {reference.max(1).min():.1f} .. {reference.max():.1f}")


def clustered_features(rng: np.random.Generator, rows: int, dim: int, clusters: int) -> np.ndarray:
    """Synthetic post-ReLU-like features: ``clusters`` anisotropic blobs, clipped at 0: (N, D)."""
    centres = rng.gamma(2.0, 1.0, (clusters, dim))  # (K, D)
    scales = rng.uniform(0.1, 0.8, (clusters, dim))  # (K, D)
    members = rng.integers(clusters, size=rows)
    return np.maximum(centres[members] + scales[members] * rng.normal(size=(rows, dim)), 0.0)


def fit_benchmark(arguments: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    clusters = arguments.fit_clusters or arguments.components
    data = clustered_features(rng, arguments.fit_rows, arguments.dim, clusters)
    data = (data - data.mean(0)) / np.maximum(data.std(0), 1e-3)  # standardised, as fit_class_gmm does
    print(f"\n(2) fitting K={arguments.components} diag GMM on {arguments.fit_rows:,} x {arguments.dim} "
          f"({clusters} synthetic clusters; tol 1e-3, reg 1e-6, max 100 iterations, k-means init)")
    print(f"  {'method':<34}{'seconds':>10}{'iterations':>12}{'log-lik/sample':>16}{'speed-up':>10}")
    start = time.perf_counter()
    reference = SklearnMixture(arguments.components, covariance_type="diag", init_params="kmeans", tol=1e-3,
                               reg_covar=1e-6, max_iter=100, random_state=0).fit(data)
    reference_time = time.perf_counter() - start
    print(f"  {'sklearn GaussianMixture':<34}{reference_time:>10.2f}{reference.n_iter_:>12}"
          f"{reference.score(data):>16.4f}{1.0:>10.2f}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float64, torch.float32):
            features = torch.from_numpy(data).to(device=device, dtype=dtype)
            seconds, mixture = best_time(lambda: fit_gmm(features, arguments.components, "diag", seed=0),
                                         1, synchronize=device == "cuda")
            likelihood = float(mixture.to("cpu", torch.float64).log_density(torch.from_numpy(data)).mean())
            name = f"bismap fit_gmm {device} {str(dtype).split('.')[-1]}"
            print(f"  {name:<34}{seconds:>10.2f}{mixture.iterations:>12}{likelihood:>16.4f}"
                  f"{reference_time / seconds:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--pixels", type=int, default=200_000)
    parser.add_argument("--fit-rows", type=int, default=300_000)
    parser.add_argument("--fit-clusters", type=int, default=None,
                        help="clusters in the synthetic fit data (default: K); more than K makes EM iterate longer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and for scikit-learn's BLAS/OpenMP (default: library defaults)")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.pixels, arguments.fit_rows, arguments.dim = 50_000, 50_000, 64
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    with threadpool_limits(limits=arguments.threads):
        scoring_benchmark(arguments)
        if not arguments.skip_fit:
            fit_benchmark(arguments)


if __name__ == "__main__":
    main()
