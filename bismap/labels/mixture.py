"""A Gaussian mixture in torch: log-density (BiSMAP Eq. 4-5) and EM fitting, on CPU or CUDA.

``log_density(x) = logsumexp_k [log pi_k + log N(x | mu_k, Sigma_k)]`` (Eq. 4
with the mixture weights pi, Eq. 5 for N). For diagonal covariances the
Mahalanobis term is expanded into two matrix products,
``(x*x) @ (1/var)^T - 2 x @ (mu/var)^T + sum(mu^2/var)``, as scikit-learn
does; full covariances use the Cholesky factor of the precision. In float64
the result equals scikit-learn's ``score_samples`` to ~1e-10 relative; in
float32 on standardised features it is within ~1e-3 absolute for log-densities
of magnitude ~1e3 (the benchmark prints the measured difference).

Fitting is EM (Dempster et al.) from a k-means++ / Lloyd initialisation, as
scikit-learn's ``init_params='kmeans'``; each iteration is one chunked pass
accumulating the sufficient statistics, so memory stays at O(chunk * K).
Random draws come from ``numpy.random.default_rng(seed)`` on the CPU, so a fit
is reproducible for a seed on a given device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

logger = logging.getLogger(__name__)

COVARIANCE_TYPES = ("diag", "full")
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    weights: torch.Tensor  # (K,) mixture weights pi_k, summing to 1
    means: torch.Tensor  # (K, D)
    covariance: str = "diag"  # 'diag' or 'full'
    variances: torch.Tensor | None = None  # (K, D) for 'diag'
    covariances: torch.Tensor | None = None  # (K, D, D) for 'full'
    converged: bool = True
    iterations: int = 0
    lower_bound: float = float("nan")  # mean log-likelihood per sample at the last E-step
    selection: list[dict[str, float]] | None = None  # held-out scores of the (K, floor) candidates, if chosen

    def __post_init__(self) -> None:
        if self.covariance not in COVARIANCE_TYPES:
            raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got '{self.covariance}'")
        spread = self.variances if self.covariance == "diag" else self.covariances
        expected = tuple(self.means.shape) + (() if self.covariance == "diag" else (self.means.shape[1],))
        if spread is None or tuple(spread.shape) != expected or self.weights.shape != self.means.shape[:1]:
            raise ValueError(f"{self.covariance} mixture needs weights (K,), means (K, D) and "
                             f"{'variances (K, D)' if self.covariance == 'diag' else 'covariances (K, D, D)'}")

    @property
    def components(self) -> int:
        return int(self.means.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.means.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianMixture:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)
        return replace(self, weights=move(self.weights), means=move(self.means),
                       variances=move(self.variances), covariances=move(self.covariances))

    def component_log_joint(self, features: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x | mu_k, Sigma_k) for every component: (N, D) -> (N, K)."""
        if self.covariance == "diag":
            precisions, linear, constant = diag_parameters(self.weights, self.means, self.variances)
            return diag_log_joint(features, precisions, linear, constant)
        return _full_log_joint(features, self.weights, self.means, self.covariances)

    def log_density(self, features: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
        """BiSMAP Eq. 4: logsumexp over components, computed in chunks of rows: (N, D) -> (N,)."""
        features = features.to(device=self.means.device, dtype=self.means.dtype)
        parts = [self.component_log_joint(chunk).logsumexp(dim=1) for chunk in features.split(chunk_rows)]
        return torch.cat(parts) if parts else features.new_empty(0)


def diag_parameters(weights: torch.Tensor, means: torch.Tensor,
                    variances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precisions (K, D), means*precisions (K, D), and the per-component constant (K,) of Eq. 5."""
    precisions = 1.0 / variances  # (K, D)
    linear = means * precisions  # (K, D)
    squared_mean = (means * linear).sum(dim=1)  # (K,) mu^T Sigma^-1 mu
    constant = weights.log() - 0.5 * (squared_mean + variances.log().sum(dim=1) + means.shape[1] * LOG_2PI)
    return precisions, linear, constant


def diag_log_joint(features: torch.Tensor, precisions: torch.Tensor, linear: torch.Tensor,
                   constant: torch.Tensor, squared: torch.Tensor | None = None) -> torch.Tensor:
    """-0.5 (x*x) @ P^T + x @ (mu P)^T + c: two matrix products, (N, D) -> (N, K).

    ``squared``: x*x when the caller has it already.
    """
    squared = features * features if squared is None else squared  # (N, D)
    joint = torch.addmm(constant, squared, precisions.T, alpha=-0.5)  # (N, K)
    return joint.addmm_(features, linear.T)


def precision_cholesky(covariances: torch.Tensor) -> torch.Tensor:
    """P with Sigma^-1 = P P^T (scikit-learn's precisions_cholesky_): (K, D, D)."""
    lower = torch.linalg.cholesky(covariances)  # (K, D, D)
    identity = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    return torch.linalg.solve_triangular(lower, identity.expand_as(lower), upper=False).transpose(-1, -2)


def _full_log_joint(features: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                    covariances: torch.Tensor) -> torch.Tensor:
    precision_factors = precision_cholesky(covariances)  # (K, D, D)
    log_determinants = precision_factors.diagonal(dim1=-2, dim2=-1).log().sum(dim=1)  # (K,) log|Sigma|^-1/2
    columns = []
    for factor, mean in zip(precision_factors, means):
        whitened = features @ factor - mean @ factor  # (N, D)
        columns.append((whitened * whitened).sum(dim=1))  # (N,) Mahalanobis distance
    mahalanobis = torch.stack(columns, dim=1)  # (N, K)
    return weights.log() + log_determinants - 0.5 * (mahalanobis + features.shape[1] * LOG_2PI)


# (chunk (n, D), chunk * chunk (n, D), index of its first row)
#     -> responsibilities (n, K), log-likelihood (n,) or None
Responsibilities = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]


def _statistics(features: torch.Tensor, responsibilities: Responsibilities, covariance: str,
                chunk_rows: int) -> tuple[list[torch.Tensor], float]:
    """Sufficient statistics [sum r (K,), sum r x (K, D), sum r x^2 (K, D) or r x x^T (K, D, D)]."""
    totals: list[torch.Tensor] | None = None
    log_likelihood = 0.0
    for start in range(0, len(features), chunk_rows):
        chunk = features[start:start + chunk_rows]  # (n, D)
        squared = chunk * chunk  # (n, D)
        weights, log_norm = responsibilities(chunk, squared, start)  # (n, K), (n,)
        second = (weights.T @ squared if covariance == "diag"
                  else torch.stack([(chunk * column[:, None]).T @ chunk for column in weights.T]))
        parts = [weights.sum(dim=0), weights.T @ chunk, second]
        totals = parts if totals is None else [total + part for total, part in zip(totals, parts)]
        log_likelihood += float(log_norm.sum()) if log_norm is not None else 0.0
    return totals, log_likelihood / len(features)


def _maximisation(statistics: list[torch.Tensor], count: int, covariance: str,
                  regularization: float) -> GaussianMixture:
    """M-step: weights, means and (regularised) covariances from the sufficient statistics."""
    sums, first, second = statistics
    sums = sums + 10 * torch.finfo(sums.dtype).eps  # (K,) as scikit-learn: no empty component
    means = first / sums[:, None]  # (K, D)
    if covariance == "diag":
        variances = (second / sums[:, None] - means * means).clamp_(min=0) + regularization  # (K, D)
        return GaussianMixture(sums / count, means, "diag", variances=variances)
    covariances = second / sums[:, None, None] - means[:, :, None] * means[:, None, :]  # (K, D, D)
    covariances = 0.5 * (covariances + covariances.transpose(1, 2))
    covariances += regularization * torch.eye(means.shape[1], dtype=means.dtype, device=means.device)
    return GaussianMixture(sums / count, means, "full", covariances=covariances)


def _squared_norms(features: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """||x||^2 of every row: (N, D) -> (N,)."""
    return torch.cat([(chunk * chunk).sum(dim=1) for chunk in features.split(chunk_rows)])


def _squared_distances(features: torch.Tensor, norms: torch.Tensor, centres: torch.Tensor,
                       chunk_rows: int) -> torch.Tensor:
    """||x - c||^2 from the row norms ||x||^2 (N,): (N, D), (M, D) -> (N, M) float64, clamped at 0."""
    products = torch.cat([chunk @ centres.T for chunk in features.split(chunk_rows)])  # (N, M)
    distances = norms[:, None] - 2 * products + (centres * centres).sum(dim=1)
    return distances.double().clamp_(min=0)


def kmeans_plus_plus(features: torch.Tensor, clusters: int, rng: np.random.Generator,
                     chunk_rows: int = 65536, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; 2 + log K trials per centre, as
    scikit-learn): centres (K, D), every draw from ``rng``. ``norms``: ||x||^2 (N,) if known."""
    norms = _squared_norms(features, chunk_rows) if norms is None else norms
    trials = 2 + int(math.log(clusters))
    chosen = [int(rng.integers(len(features)))]
    closest = _squared_distances(features, norms, features[chosen], chunk_rows)[:, 0]  # (N,)
    for _ in range(1, clusters):
        cumulative = closest.cumsum(0)  # (N,)
        targets = torch.from_numpy(rng.random(trials) * float(cumulative[-1])).to(cumulative.device)  # (T,)
        candidates = torch.searchsorted(cumulative, targets, right=True).clamp_(max=len(features) - 1)  # (T,)
        distances = _squared_distances(features, norms, features[candidates], chunk_rows)  # (N, T)
        distances = torch.minimum(distances, closest[:, None])
        best = int(distances.sum(dim=0).argmin())  # the candidate that lowers the potential most
        chosen.append(int(candidates[best]))
        closest = distances[:, best]
    return features[chosen].clone()


def _lloyd_pass(features: torch.Tensor, centres: torch.Tensor,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest centre of every row (N,), and rows (K,) and feature sums (K, D) per centre."""
    squared_centres = (centres * centres).sum(1)  # (K,)
    assignments, counts, sums = [], torch.zeros_like(squared_centres), torch.zeros_like(centres)
    for chunk in features.split(chunk_rows):
        nearest = torch.addmm(squared_centres, chunk, centres.T, alpha=-2).argmin(dim=1)  # (n,)
        one_hot = torch.nn.functional.one_hot(nearest, len(centres)).to(chunk.dtype)  # (n, K)
        assignments.append(nearest)
        counts += one_hot.sum(dim=0)
        sums += one_hot.T @ chunk
    return torch.cat(assignments), counts, sums


def kmeans(features: torch.Tensor, clusters: int, iterations: int, rng: np.random.Generator,
           chunk_rows: int = 65536, tolerance: float = 1e-4) -> torch.Tensor:
    """Lloyd's k-means from k-means++ centres; returns the assignments (N,) to the final centres.

    Stops when no assignment changes or the centres move by less than
    ``tolerance`` times the mean feature variance (scikit-learn's criterion).
    Empty clusters keep their centre.
    """
    norms = _squared_norms(features, chunk_rows)  # (N,)
    centres = kmeans_plus_plus(features, clusters, rng, chunk_rows, norms)  # (K, D)
    mean = features.sum(dim=0, dtype=torch.float64) / len(features)  # (D,)
    mean_variance = (float(norms.double().mean()) - float((mean * mean).sum())) / features.shape[1]
    limit = tolerance * mean_variance
    previous = None
    for _ in range(iterations):
        assignments, counts, sums = _lloyd_pass(features, centres, chunk_rows)
        filled = counts > 0
        updated = centres.clone()
        updated[filled] = sums[filled] / counts[filled, None]
        shift = float(((updated - centres) ** 2).sum())
        centres = updated
        if (previous is not None and torch.equal(previous, assignments)) or shift <= limit:
            break
        previous = assignments
    return _lloyd_pass(features, centres, chunk_rows)[0]


def fit_gmm(features: torch.Tensor, components: int = 8, covariance: str = "diag", max_iterations: int = 100,
            tolerance: float = 1e-3, regularization: float = 1e-6, seed: int = 0,
            kmeans_iterations: int = 100, chunk_rows: int = 65536) -> GaussianMixture:
    """EM fit of a K-component GMM on features (N, D), in their dtype and on their device.

    Stops when the mean log-likelihood per sample changes by less than
    ``tolerance`` (scikit-learn's ``tol``). ``regularization`` is added to the
    variances (the diagonal of full covariances), as scikit-learn's ``reg_covar``.
    """
    if covariance not in COVARIANCE_TYPES:
        raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got '{covariance}'")
    if len(features) < components:
        raise ValueError(f"cannot fit {components} components on {len(features)} features")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    assignments = kmeans(features, components, kmeans_iterations, np.random.default_rng(seed), chunk_rows)
    mixture = _initial_mixture(features, assignments, components, covariance, regularization, chunk_rows)
    previous, converged, iteration = -math.inf, False, 0
    for iteration in range(1, max_iterations + 1):
        statistics, lower_bound = _statistics(features, _expectation(mixture), covariance, chunk_rows)
        mixture = _maximisation(statistics, len(features), covariance, regularization)
        if abs(lower_bound - previous) < tolerance:
            converged = True
            break
        previous = lower_bound
    if not converged:
        logger.warning("GMM EM did not converge in %d iterations (change %.3g >= %.3g)",
                       max_iterations, abs(lower_bound - previous), tolerance)
    return replace(mixture, converged=converged, iterations=iteration, lower_bound=lower_bound)


def _initial_mixture(features: torch.Tensor, assignments: torch.Tensor, components: int, covariance: str,
                     regularization: float, chunk_rows: int) -> GaussianMixture:
    """M-step on the k-means labels as one-hot responsibilities (scikit-learn's init_params='kmeans')."""
    def hard(chunk: torch.Tensor, squared: torch.Tensor, start: int) -> tuple[torch.Tensor, None]:
        labels = assignments[start:start + len(chunk)]  # (n,)
        return torch.nn.functional.one_hot(labels, components).to(chunk.dtype), None
    statistics = _statistics(features, hard, covariance, chunk_rows)[0]
    return _maximisation(statistics, len(features), covariance, regularization)


def _expectation(mixture: GaussianMixture) -> Responsibilities:
    """E-step: responsibilities (n, K) and log-likelihood (n,) of a chunk under ``mixture``."""
    if mixture.covariance == "diag":
        parameters = diag_parameters(mixture.weights, mixture.means, mixture.variances)
        log_joint = lambda chunk, squared: diag_log_joint(chunk, *parameters, squared)  # noqa: E731
    else:
        log_joint = lambda chunk, squared: mixture.component_log_joint(chunk)  # noqa: E731

    def responsibilities(chunk: torch.Tensor, squared: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        joint = log_joint(chunk, squared)  # (n, K)
        log_norm = joint.logsumexp(dim=1)  # (n,)
        return (joint - log_norm[:, None]).exp_(), log_norm
    return responsibilities
