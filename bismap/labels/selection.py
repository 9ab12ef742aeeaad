"""Choosing K and the variance floor of each class's MAPs on held-out source features (BiSMAP Eq. 4-5).

The paper fixes K = 8 diagonal Gaussians per class for 256-d GTA5 features
and gives no variance floor. On other features both matter: post-ReLU decoder
features have dimensions that are exactly zero for most pixels of a class, and
a floor of 1e-6 (standardised units) makes each such dimension add ~6.9 nats
to log p_c for every target pixel that is zero there too, so shared zeros can
weigh in the class argmax (README: "Paper and public code" measures what the
floor changes).

Each class therefore picks its own (K, floor) from candidate lists by the mean
log-likelihood of held-out source features: the rows are a uniform sample
(``bismap.labels.features``), the first ``selection_features`` of them are split
into a fitting part and the last ``held_out_fraction`` held out, every
candidate is fitted on the first part and scored on the held-out part, and
the best candidate is refitted on all rows. Only source features of the class
itself are used: no target label and no other class enters the choice.
A point of a held-out row that lies off a dimension the fitting part never
varied in costs x^2 / (2 floor), so a floor that is too small loses exactly
where the fitted density is degenerate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bismap.labels.mixture import GaussianMixture, fit_gmm


@dataclass(frozen=True)
class Candidate:
    components: int  # K
    regularization: float  # variance floor added to every variance (standardised units)


@dataclass(frozen=True)
class FitOptions:
    """What every EM fit of one class shares (see ``bismap.labels.gmm.GMMSettings``)."""

    covariance: str
    max_iterations: int
    tolerance: float
    seed: int
    kmeans_iterations: int
    chunk_rows: int

    def fit(self, features: torch.Tensor, candidate: Candidate) -> GaussianMixture:
        return fit_gmm(features, candidate.components, self.covariance, self.max_iterations, self.tolerance,
                       candidate.regularization, self.seed, self.kmeans_iterations, self.chunk_rows)


def candidates(components: tuple[int, ...], regularizations: tuple[float, ...]) -> list[Candidate]:
    """Every (K, floor) pair, K outer: (K1, r1), (K1, r2), ..., (K2, r1), ..."""
    return [Candidate(int(count), float(floor)) for count in components for floor in regularizations]


def held_out_scores(features: torch.Tensor, options: FitOptions, pairs: list[Candidate],
                    held_out_fraction: float) -> list[float]:
    """Mean held-out log-likelihood of each candidate: fitted on the first rows of (N, D), scored on the rest."""
    held_out = max(1, int(round(held_out_fraction * len(features))))
    fitting, scoring = features[:-held_out], features[-held_out:]  # (N - n, D), (n, D)
    scores = []
    for candidate in pairs:
        if len(fitting) < candidate.components:
            scores.append(float("-inf"))
            continue
        scores.append(float(options.fit(fitting, candidate).log_density(scoring, options.chunk_rows).mean()))
    return scores


def select_candidate(features: torch.Tensor, options: FitOptions, pairs: list[Candidate],
                     held_out_fraction: float) -> tuple[Candidate, list[dict[str, float]]]:
    """The candidate with the best held-out log-likelihood (first on ties) and the table of all of them."""
    scores = held_out_scores(features, options, pairs, held_out_fraction)
    best = max(range(len(pairs)), key=lambda index: (scores[index], -index))
    table = [{"components": pair.components, "regularization": pair.regularization, "held_out_log_likelihood": score}
             for pair, score in zip(pairs, scores)]
    return pairs[best], table
