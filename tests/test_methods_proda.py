"""ProDA (bismap.methods.proda): prototypical weights, denoised labels, structure KL, regulariser, settings."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import masked_mean
from bismap.methods.proda import (ProdaSettings, prototype_weights, rectify_pseudo_labels, regularization_pixels,
                                  structure_kl_pixels, update_prototypes)
from bismap.settings import SettingsError, from_dict


def feature_map(rows: list[list[float]]) -> torch.Tensor:
    """(1, D, 1, N) from N D-vectors."""
    return torch.tensor(rows, dtype=torch.float64).T[None, :, None, :]


PROTOTYPES = torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)


def test_weights_are_the_softmax_of_negative_distances() -> None:
    features = feature_map([[1.0, 0.0]])  # distances 1 and 3
    weights = prototype_weights(features, PROTOTYPES, temperature=1.0)[0, :, 0, 0]
    expected_first = math.exp(-1) / (math.exp(-1) + math.exp(-3))
    assert weights.tolist() == pytest.approx([expected_first, 1 - expected_first])
    sharper = prototype_weights(features, PROTOTYPES, temperature=0.5)[0, 0, 0, 0].item()
    assert sharper == pytest.approx(math.exp(-2) / (math.exp(-2) + math.exp(-6)))


def test_absent_prototype_gets_zero_weight() -> None:
    prototypes = torch.tensor([[0.0, 0.0], [math.nan, math.nan]], dtype=torch.float64)
    weights = prototype_weights(feature_map([[1.0, 1.0]]), prototypes, 1.0)[0, :, 0, 0]
    assert weights.tolist() == [1.0, 0.0]


def test_prototype_weight_flips_the_label_of_the_raw_argmax() -> None:
    features = feature_map([[4.0, 0.0], [0.0, 0.0]])  # pixel 0 sits on prototype 1, pixel 1 on prototype 0
    weights = prototype_weights(features, PROTOTYPES, 1.0)  # (1, 2, 1, 2)
    soft_labels = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64).T[None, :, None, :]
    labels, confidence = rectify_pseudo_labels(soft_labels, weights)
    assert soft_labels.argmax(dim=1).tolist() == [[[0, 0]]]
    assert labels.tolist() == [[[1, 0]]]  # pixel 0 flipped by its prototype
    # pixel 0: w = (e^-4, 1) / (e^-4 + 1); w * p renormalised
    w0 = math.exp(-4) / (math.exp(-4) + 1)
    assert confidence[0, 0, 0].item() == pytest.approx(0.4 * (1 - w0) / (0.4 * (1 - w0) + 0.6 * w0))


def test_threshold_and_valid_mask_ignore_pixels() -> None:
    soft_labels = torch.tensor([[0.55, 0.45], [0.9, 0.1]]).T[None, :, None, :]
    weights = torch.full_like(soft_labels, 0.5)
    labels, _ = rectify_pseudo_labels(soft_labels, weights, threshold=0.6)
    assert labels.tolist() == [[[IGNORE_INDEX, 0]]]
    labels, _ = rectify_pseudo_labels(soft_labels, weights, valid=torch.tensor([[[True, False]]]))
    assert labels.tolist() == [[[0, IGNORE_INDEX]]]


def test_update_uses_momentum_features_centroids() -> None:
    features = feature_map([[2.0, 2.0], [4.0, 2.0], [9.0, 9.0]])
    labels = torch.tensor([[[0, 0, IGNORE_INDEX]]])
    updated = update_prototypes(PROTOTYPES, features, labels, momentum=0.5)
    assert updated.tolist() == [[1.5, 1.0], [4.0, 0.0]]  # 0.5 * (0, 0) + 0.5 * (3, 2); class 1 kept


def test_update_steps_once_per_image_and_skips_small_classes() -> None:
    features = torch.cat([feature_map([[2.0, 2.0], [4.0, 2.0]]), feature_map([[6.0, 6.0], [0.0, 0.0]])])  # (2, 2, 1, 2)
    labels = torch.tensor([[[0, 0]], [[0, 1]]])
    updated = update_prototypes(PROTOTYPES, features, labels, momentum=0.5)
    # class 0: image 0 -> 0.5 * (0, 0) + 0.5 * (3, 2) = (1.5, 1); image 1 -> 0.5 * (1.5, 1) + 0.5 * (6, 6) = (3.75, 3.5)
    # (one step with the batch centroid (4, 10/3) would give (2, 5/3)); class 1: 0.5 * (4, 0) + 0.5 * (0, 0)
    assert updated.tolist() == [[3.75, 3.5], [2.0, 0.0]]
    at_least_two = update_prototypes(PROTOTYPES, features, labels, momentum=0.5, minimum_pixels=2)
    assert at_least_two.tolist() == [[1.5, 1.0], [4.0, 0.0]]  # image 1 has one pixel of each class: no step


def test_structure_kl_is_zero_for_equal_views_and_matches_hand_value() -> None:
    weak = feature_map([[1.0, 0.0]])
    assert masked_mean(*structure_kl_pixels(weak, weak.clone(), PROTOTYPES, 1.0)).item() == pytest.approx(0.0)
    strong = feature_map([[3.0, 0.0]])  # distances 3 and 1: the assignment is mirrored
    values, mask = structure_kl_pixels(weak, strong, PROTOTYPES, 1.0)
    teacher = torch.tensor([-1.0, -3.0]).softmax(0)
    student = torch.tensor([-3.0, -1.0]).softmax(0)
    expected = (teacher * (teacher.log() - student.log())).sum().item() / 2  # mean over the K = 2 classes
    assert mask is None and values.item() == pytest.approx(expected, rel=1e-5)


def test_structure_kl_gradient_reaches_only_the_strong_features() -> None:
    weak = feature_map([[1.0, 0.0]]).requires_grad_(True)
    strong = feature_map([[3.0, 0.5]]).requires_grad_(True)
    values, _ = structure_kl_pixels(weak, strong, PROTOTYPES, 1.0)
    values.sum().backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


def test_regularizer_is_smallest_for_uniform_predictions_with_mask() -> None:
    uniform = torch.zeros(1, 4, 1, 1)
    peaked = torch.tensor([5.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    uniform_value, _ = regularization_pixels(uniform)
    assert uniform_value.item() == pytest.approx(math.log(4))  # -(1/K) sum_k log(1/K), the public mean over classes
    assert regularization_pixels(peaked)[0].item() > uniform_value.item()
    both = torch.cat([uniform, peaked], dim=3)  # (1, 4, 1, 2)
    values, mask = regularization_pixels(both, mask=torch.tensor([[[True, False]]]))
    assert masked_mean(values, mask).item() == pytest.approx(math.log(4))


def test_settings_default_to_the_paper_and_refuse_unknown_keys() -> None:
    settings = from_dict(ProdaSettings, {}, "proda")
    assert (settings.temperature, settings.prototype_momentum, settings.kl_weight,
            settings.regularization_weight) == (1.0, 0.9999, 10.0, 0.1)
    with pytest.raises(SettingsError):
        from_dict(ProdaSettings, {"tau": 1.0}, "proda")
    with pytest.raises(ValueError):
        ProdaSettings(temperature=0.0)
