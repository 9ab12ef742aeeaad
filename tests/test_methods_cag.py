"""CAG-UDA (bismap.methods.cag): anchors, active-sample labels with a margin, distance loss, schedule."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.labels.strategies import assign_cas
from bismap.losses import masked_mean
from bismap.methods.cag import (CagSchedule, CagSettings, anchor_distance_pairs, anchor_pseudo_labels,
                                category_anchors, probability_pseudo_labels)
from bismap.settings import SettingsError, from_dict

ANCHORS = torch.tensor([[0.0, 0.0], [4.0, 0.0]])


def feature_map(rows: list[list[float]]) -> torch.Tensor:
    """(1, D, 1, N) from N D-vectors."""
    return torch.tensor(rows).T[None, :, None, :]


def test_anchors_are_source_class_centroids() -> None:
    features = feature_map([[0.0, 2.0], [2.0, 0.0], [5.0, 5.0]])
    anchors = category_anchors(features, torch.tensor([[[0, 0, IGNORE_INDEX]]]), num_classes=2)
    assert anchors[0].tolist() == [1.0, 1.0] and torch.isnan(anchors[1]).all()


def test_equidistant_pixel_is_ignored_and_clearly_closer_one_assigned() -> None:
    features = feature_map([[2.0, 0.0], [0.5, 0.0], [1.0, 0.0], [3.9, 1.0]])
    labels, gaps = anchor_pseudo_labels(features, ANCHORS, margin=2.5)
    # distances: (2, 2) tie; (0.5, 3.5) gap 3; (1, 3) gap 2 < 2.5; (sqrt(16.21), sqrt(1.01))
    assert labels.tolist() == [[[IGNORE_INDEX, 0, IGNORE_INDEX, 1]]]
    assert gaps[0, 0, :3].tolist() == pytest.approx([0.0, 3.0, 2.0], abs=1e-5)
    assert gaps[0, 0, 3].item() == pytest.approx(math.sqrt(16.21) - math.sqrt(1.01), abs=1e-5)


def test_labels_agree_with_the_cas_pseudo_label_strategy() -> None:
    features = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    anchors = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    labels, _ = anchor_pseudo_labels(features, anchors, margin=0.3)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 3)
    cas_labels, _ = assign_cas(rows, anchors, margin=0.3)
    assert torch.equal(labels.reshape(-1), cas_labels)


def distance_case(mean: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, 2, 1, 12) features: 10 pixels of class 0 predicted 0 with mean ``mean``, 2 labelled 0 but predicted 1."""
    rows = [[mean[0] - 0.5, mean[1]], [mean[0] + 0.5, mean[1]]] * 5 + [[50.0, 50.0]] * 2
    labels = torch.zeros(1, 1, 12, dtype=torch.long)
    logits = torch.zeros(1, 2, 1, 12)
    logits[0, 0, 0, :10] = 1.0
    logits[0, 1, 0, 10:] = 1.0
    return feature_map(rows), labels, logits


def test_anchor_distance_is_smooth_l1_of_the_class_mean() -> None:
    features, labels, logits = distance_case([0.5, 2.0])
    features.requires_grad_(True)
    anchors = torch.tensor([[0.0, 0.0], [math.nan, math.nan]])
    values, pairs = anchor_distance_pairs(features, labels, logits, anchors)
    assert pairs.tolist() == [[True, False]]  # the 2 mispredicted pixels (features 50) are left out
    assert values[0, 0].item() == pytest.approx(8.125)  # 10 * mean(0.5 * 0.5^2, 2 - 0.5)
    masked_mean(values, pairs).backward()
    # d/dmean = 10 * (0.5, 1) / 2, times 1/10 per pixel, times 2 * 10 / 12 (public gradient scaling)
    assert features.grad[0, :, 0, 0].tolist() == pytest.approx([2.5 / 6, 5.0 / 6])
    assert features.grad[0, :, 0, 11].tolist() == [0.0, 0.0]


def test_large_anchor_distance_is_divided_by_ten_and_small_classes_are_left_out() -> None:
    features, labels, logits = distance_case([20.0, 0.0])
    values, pairs = anchor_distance_pairs(features, labels, logits, torch.zeros(2, 2))
    assert values[0, 0].item() == pytest.approx(9.75)  # 10 * (19.5 / 2) / 10: above 5, divided once
    logits[0, :, 0, 9] = torch.tensor([0.0, 1.0])  # 9 agreeing pixels: under the minimum of 10
    _, pairs = anchor_distance_pairs(features, labels, logits, torch.zeros(2, 2))
    assert not pairs.any()


def test_probability_labels_keep_confident_pixels() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0]]).T[None, :, None, :]  # (1, 2, 1, 2)
    labels, confidence = probability_pseudo_labels(logits, threshold=0.95)
    assert labels.tolist() == [[[0, IGNORE_INDEX]]]
    assert confidence[0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-5)))
    labels, _ = probability_pseudo_labels(torch.zeros(1, 2, 1, 1), threshold=0.5)
    assert labels.tolist() == [[[IGNORE_INDEX]]]  # softmax 0.5 is not > 0.5 (public code: strict)


def test_schedule_lists_the_stages_and_finds_an_iteration() -> None:
    schedule = from_dict(CagSchedule, {"iterations_per_stage": 100}, "cag.schedule")
    assert [(stage.index, stage.first_iteration) for stage in schedule.stage_list()] == [(1, 0), (2, 100), (3, 200)]
    assert schedule.stage_at(150).index == 2 and schedule.stage_at(299).index == 3
    with pytest.raises(ValueError):
        schedule.stage_at(300)
    with pytest.raises(SettingsError):
        from_dict(CagSchedule, {}, "cag.schedule")  # the paper fixes no stage length


def test_settings_default_to_the_paper_and_refuse_unknown_keys() -> None:
    settings = from_dict(CagSettings, {}, "cag")
    assert (settings.margin, settings.distance_weight, settings.cross_entropy_weight,
            settings.probability_threshold) == (2.5, 0.3, 0.7, 0.95)
    with pytest.raises(SettingsError):
        from_dict(CagSettings, {"delta": 2.5}, "cag")
