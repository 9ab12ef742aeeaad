"""Distribution alignment of the consistency teacher (bismap.methods.alignment), by hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from bismap.methods.alignment import ClassDistributions, predicted_class_mass, shares
from bismap.methods.prototypes import class_pixel_counts


def test_label_shares_count_labelled_pixels_only():
    labels = torch.tensor([[[0, 0, 1, 255], [2, 2, 2, 255]]])  # (1, 2, 4): 6 labelled pixels
    assert class_pixel_counts(labels, 4).tolist() == [2.0, 1.0, 3.0, 0.0]
    assert shares(class_pixel_counts(labels, 4)).tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6, 0.0])
    assert shares(class_pixel_counts(torch.full((1, 2, 2), 255), 3)).tolist() == [0.0, 0.0, 0.0]


def test_predicted_shares_are_the_mean_softmax():
    probabilities = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).reshape(1, 2, 1, 2)  # (1, K=2, 1, 2)
    assert predicted_class_mass(probabilities).tolist() == pytest.approx([1.2, 0.8])
    assert shares(predicted_class_mass(probabilities)).tolist() == pytest.approx([0.6, 0.4])


def test_running_distributions_follow_their_moving_averages():
    distributions = ClassDistributions(num_classes=2, momentum=0.5)
    assert distributions.source.tolist() == [0.5, 0.5] and distributions.predicted.tolist() == [0.5, 0.5]
    for _ in range(2):
        distributions.update(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0]))
    assert distributions.source.tolist() == pytest.approx([0.875, 0.125])  # 0.5 -> 0.75 -> 0.875
    assert distributions.predicted.tolist() == pytest.approx([0.8, 0.2])  # 0.5 -> 0.7 -> 0.8
    assert distributions.labels.tolist() == pytest.approx([0.125, 0.875])


def test_an_over_predicted_class_gives_way_to_the_next_most_likely():
    """Source 50/50, teacher predicts class 0 on 80% of the target: p = (0.6, 0.4) becomes (0.27, 0.73)."""
    distributions = ClassDistributions(num_classes=2, momentum=0.0)  # momentum 0: the batch's shares
    distributions.update(torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]))
    probabilities = torch.tensor([0.6, 0.4]).reshape(1, 2, 1, 1)
    aligned = distributions.align(probabilities).flatten()
    expected = torch.tensor([0.6 * 0.5 / 0.8, 0.4 * 0.5 / 0.2])
    assert aligned.tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert aligned.argmax().item() == 1 and aligned.sum().item() == pytest.approx(1.0)


def test_matching_distributions_leave_the_teacher_unchanged():
    distributions = ClassDistributions(num_classes=3, momentum=0.9)
    probabilities = torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert torch.allclose(distributions.align(probabilities), probabilities)  # both uniform at the start


def test_pseudo_label_weights_are_the_capped_source_over_label_share():
    """Source 1/3 each; labels 60% class 0, 30% class 1, 10% class 2: weights 0.56, 1.11, and 3.33 capped at 2."""
    distributions = ClassDistributions(num_classes=3, momentum=0.0, weight_cap=2.0)
    distributions.update(torch.full((3,), 1 / 3), torch.full((3,), 1 / 3), torch.tensor([0.6, 0.3, 0.1]))
    labels = torch.tensor([[[0, 1, 2, 255]]])  # (1, 1, 4)
    assert distributions.label_weights(labels).flatten().tolist() == pytest.approx([1 / 1.8, 1 / 0.9, 2.0, 0.0])


def test_a_momentum_outside_zero_to_one_or_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="momentum must be in"):
        ClassDistributions(num_classes=2, momentum=1.0)
    with pytest.raises(ValueError, match="cap must be >= 1"):
        ClassDistributions(num_classes=2, momentum=0.5, weight_cap=0.5)
