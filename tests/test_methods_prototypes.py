"""Shared prototypes (bismap.methods.prototypes): centroids, momentum update, distances, margin assignment."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.methods.prototypes import (class_centroids, class_feature_sums, margin_assignment, momentum_update,
                                       pixel_cosine_similarities, pixel_distances, soft_class_feature_sums)

NAN = math.nan


def feature_map(rows: list[list[float]]) -> torch.Tensor:
    """A (1, D, 1, N) feature map whose pixels are the given D-vectors, left to right."""
    return torch.tensor(rows, dtype=torch.float64).T[None, :, None, :]


def test_centroids_average_each_class_and_skip_ignored_pixels() -> None:
    features = feature_map([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0], [99.0, 99.0]])
    labels = torch.tensor([[[0, 0, 1, IGNORE_INDEX]]])
    centroids = class_centroids(features, labels, num_classes=3)
    assert torch.allclose(centroids[0], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(centroids[1], torch.tensor([10.0, 10.0], dtype=torch.float64))
    assert torch.isnan(centroids[2]).all()  # no pixel of class 2: no prototype


def test_sums_of_two_halves_give_the_centroid_of_the_whole() -> None:
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5))
    sums_a, counts_a = class_feature_sums(features[:1], labels[:1], 3)
    sums_b, counts_b = class_feature_sums(features[1:], labels[1:], 3)
    whole = class_centroids(features, labels, 3)
    assert torch.allclose((sums_a + sums_b) / (counts_a + counts_b)[:, None], whole)


def test_soft_sums_with_one_hot_assignments_equal_the_hard_sums() -> None:
    features = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    labels = torch.randint(0, 2, (1, 3, 3))
    one_hot = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).double()
    soft_sums, soft_counts = soft_class_feature_sums(features, one_hot)
    hard_sums, hard_counts = class_feature_sums(features, labels, 2)
    assert torch.allclose(soft_sums, hard_sums) and torch.allclose(soft_counts, hard_counts)


def test_momentum_update_hand_computed_and_absent_class_kept() -> None:
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = torch.tensor([[3.0, 2.0], [NAN, NAN]])  # class 1 absent from the batch
    updated = momentum_update(prototypes, batch, momentum=0.75)
    # class 0: 0.75 * (1, 0) + 0.25 * (3, 2) = (1.5, 0.5)
    assert torch.allclose(updated[0], torch.tensor([1.5, 0.5]))
    assert torch.equal(updated[1], torch.tensor([0.0, 1.0]))


def test_momentum_update_initialises_a_class_seen_for_the_first_time() -> None:
    prototypes = torch.tensor([[NAN, NAN], [0.0, 1.0]])
    batch = torch.tensor([[3.0, 2.0], [2.0, 1.0]])
    updated = momentum_update(prototypes, batch, momentum=0.9)
    assert torch.equal(updated[0], torch.tensor([3.0, 2.0]))
    assert torch.allclose(updated[1], torch.tensor([0.2, 1.0]))


def test_momentum_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        momentum_update(torch.zeros(1, 1), torch.zeros(1, 1), momentum=1.5)


def test_distances_and_similarities_per_pixel_and_prototype() -> None:
    features = feature_map([[3.0, 4.0], [0.0, 2.0]])
    prototypes = torch.tensor([[0.0, 0.0], [0.0, 1.0], [NAN, NAN]], dtype=torch.float64)
    distances = pixel_distances(features, prototypes)  # (1, 3, 1, 2)
    assert torch.allclose(distances[0, :2, 0], torch.tensor([[5.0, 2.0], [math.sqrt(9 + 9), 1.0]],
                                                            dtype=torch.float64))
    assert torch.isinf(distances[0, 2]).all()
    similarities = pixel_cosine_similarities(features, prototypes)
    assert similarities[0, 1, 0, 0].item() == pytest.approx(0.8)  # (3, 4) . (0, 1) / 5
    assert similarities[0, 1, 0, 1].item() == pytest.approx(1.0)
    assert (similarities[0, 2] == -math.inf).all()


def test_margin_assignment_is_strict_and_ignores_ties() -> None:
    distances = torch.tensor([[1.0, 1.0, 5.0],   # tie: ignored whatever the margin
                              [1.0, 3.5, 5.0],   # gap 2.5, margin 2.0: kept
                              [1.0, 3.0, 5.0],   # gap exactly 2.0: not > margin
                              [torch.inf, torch.inf, torch.inf]])
    labels, gaps = margin_assignment(distances, margin=2.0)
    assert labels.tolist() == [IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert gaps[:3].tolist() == [0.0, 2.5, 2.0]
