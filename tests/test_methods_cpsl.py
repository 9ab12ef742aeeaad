"""CPSL (bismap.methods.cpsl): Sinkhorn-Knopp self-labels, sampling, distribution alignment, losses."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import masked_mean
from bismap.methods.cpsl import (CpslSettings, class_balanced_sample, class_distribution_from_counts,
                                 class_pixel_counts, cluster_probabilities, consistency_pixels, enqueue,
                                 image_class_distribution, online_assignments, self_labeling_loss_pixels,
                                 sinkhorn_knopp, update_class_distribution)
from bismap.settings import SettingsError, from_dict

SHARES = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])


def random_scores(rows: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, len(SHARES), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sinkhorn_marginals_are_r_and_uniform() -> None:
    plan = sinkhorn_knopp(random_scores(), SHARES, epsilon=0.05, iterations=300)  # (200, 5)
    assert torch.allclose(plan.sum(dim=0), SHARES, atol=1e-4)
    assert torch.allclose(plan.sum(dim=1), torch.full((200,), 1 / 200), atol=1e-4)


def test_sinkhorn_rows_are_exact_after_the_default_three_iterations() -> None:
    plan = sinkhorn_knopp(random_scores(), SHARES, 0.05, CpslSettings().sinkhorn_iterations)
    assert torch.allclose(plan.sum(dim=1), torch.full((200,), 1 / 200), atol=1e-6)
    assert not torch.allclose(plan.sum(dim=0), SHARES, atol=1e-4)  # columns still converging at 3


def test_sinkhorn_follows_r_where_argmax_puts_everything_in_one_class() -> None:
    # every pixel scores class 0 highest; groups of 30, 20, 10 have a second choice 1, 2, 3
    scores = torch.zeros(100, 4)
    scores[:, 0] = 1.0
    for class_id, (start, stop) in zip((1, 2, 3), ((40, 70), (70, 90), (90, 100))):
        scores[start:stop, class_id] = 0.9
    assert scores.argmax(dim=1).bincount(minlength=4).tolist() == [100, 0, 0, 0]
    plan = sinkhorn_knopp(scores, torch.tensor([0.4, 0.3, 0.2, 0.1]), 0.05, 300)
    assert plan.argmax(dim=1).bincount(minlength=4).tolist() == [40, 30, 20, 10]
    assert plan[40:70].argmax(dim=1).eq(1).all() and plan[90:].argmax(dim=1).eq(3).all()


def test_class_with_zero_share_receives_nothing() -> None:
    plan = sinkhorn_knopp(random_scores(50), torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]), 0.05, 200)
    assert plan[:, 2:].abs().max().item() == 0.0
    assert torch.allclose(plan.sum(dim=0)[:2], torch.tensor([0.5, 0.5]), atol=1e-4)


def test_online_assignments_are_the_current_rows_of_the_augmented_plan() -> None:
    memory, current = random_scores(150, seed=1), random_scores(50, seed=2)
    labels = online_assignments(current, memory, SHARES, 0.05, 3)  # (50, 5)
    full = sinkhorn_knopp(torch.cat([memory, current]), SHARES, 0.05, 3)
    assert torch.allclose(labels, full[150:] * 200)
    assert torch.allclose(labels.sum(dim=1), torch.ones(50), atol=1e-5)


def test_memory_keeps_the_newest_rows() -> None:
    memory = enqueue(None, torch.arange(6.0).view(3, 2), length=4)
    memory = enqueue(memory, torch.tensor([[6.0, 7.0], [8.0, 9.0]]), length=4)
    assert memory[:, 0].tolist() == [2.0, 4.0, 6.0, 8.0]


def test_self_labeling_loss_is_the_cross_entropy_with_q() -> None:
    scores = torch.tensor([[0.08, 0.0], [0.0, 0.0]])
    assignments = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    values, mask = self_labeling_loss_pixels(scores, assignments, temperature=0.08)
    first = -math.log(math.e / (math.e + 1))  # softmax((1, 0)) after / tau
    assert mask is None and values.tolist() == pytest.approx([first, math.log(2)])
    assert masked_mean(values, mask).item() == pytest.approx((first + math.log(2)) / 2)


def test_cluster_probabilities_are_the_softmax_of_cosines_over_tau() -> None:
    features = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    head = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    probabilities = cluster_probabilities(features, head, temperature=0.5)[0, :, 0, 0]
    assert probabilities.tolist() == pytest.approx([math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)])


def test_class_balanced_sample_takes_each_class_share() -> None:
    labels = torch.cat([torch.zeros(90), torch.ones(10), torch.full((20,), IGNORE_INDEX)]).long()
    chosen = class_balanced_sample(labels, 20, torch.Generator().manual_seed(0))
    assert chosen.numel() == 20 and chosen.unique().numel() == 20
    assert labels[chosen].bincount().tolist() == [18, 2]  # floor(20 * 0.9), floor(20 * 0.1)


def test_class_balanced_sample_tops_up_the_floors_and_skips_ignored() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, IGNORE_INDEX])
    chosen = class_balanced_sample(labels, 4, torch.Generator().manual_seed(3))
    assert chosen.numel() == 4 and (labels[chosen] != IGNORE_INDEX).all()
    assert sorted(labels[chosen].bincount(minlength=3).tolist()) == [1, 1, 2]  # floors 1, 1, 1 plus one
    assert class_balanced_sample(labels, 50).tolist() == list(range(9))


def test_distribution_alignment_hand_values() -> None:
    labels = torch.tensor([[[0, 0, 1, IGNORE_INDEX]], [[IGNORE_INDEX] * 4]])  # (2, 1, 4); image 2 unlabelled
    per_image = image_class_distribution(labels, 2)
    assert torch.allclose(per_image, torch.tensor([[2 / 3, 1 / 3], [0.0, 0.0]], dtype=torch.float64))
    counts = class_pixel_counts(labels, 2)
    assert counts.tolist() == [2.0, 1.0]
    start = class_distribution_from_counts(counts + torch.tensor([1.0, 2.0]))  # Eq. 10 over counts 3, 3
    assert start.tolist() == pytest.approx([0.5, 0.5])
    updated = update_class_distribution(start, per_image, momentum=0.9)  # Eq. 11; image 2 skipped
    assert updated.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 2 / 3, 0.9 * 0.5 + 0.1 / 3])


def test_consistency_is_one_direction_kl_averaged_over_classes() -> None:
    """Eq. 13 as the public code computes it: KL(P_w || P_s) / K (was the symmetric sum, 1.8356, here 0.5034)."""
    weak = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    strong = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    p, q = weak.flatten().softmax(0), strong.flatten().softmax(0)
    expected = (p * (p / q).log()).sum() / 2  # K = 2
    values, mask = consistency_pixels(weak, strong, torch.ones(1, 1, 1, dtype=torch.bool))
    assert values.item() == pytest.approx(expected.item(), rel=1e-5)
    assert values.item() == pytest.approx(0.5034211, rel=1e-5)
    assert masked_mean(*consistency_pixels(weak, weak.clone())).item() == pytest.approx(0.0, abs=1e-7)


def test_settings_default_to_the_paper_and_refuse_unknown_keys() -> None:
    settings = from_dict(CpslSettings, {}, "cpsl")
    assert (settings.epsilon, settings.temperature, settings.self_labeling_weight, settings.consistency_weight,
            settings.samples_per_image, settings.memory_length) == (0.05, 0.08, 0.1, 5.0, 512, 65_536)
    with pytest.raises(SettingsError):
        from_dict(CpslSettings, {"eps": 0.05}, "cpsl")
