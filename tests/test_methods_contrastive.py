"""Bi-directional contrastive learning (bismap.methods.contrastive): FCL/BCL, calibration, dynamic/hybrid labels."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import masked_mean
from bismap.methods.contrastive import (ContrastiveSettings, backward_contrastive_pixels, calibrated_prototypes,
                                        class_sampling_probabilities, dynamic_pseudo_labels, entropy_pixels,
                                        forward_contrastive_pixels, hybrid_pseudo_labels)
from bismap.settings import SettingsError, from_dict

NAN = math.nan
PROTOTYPES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def feature_map(rows: list[list[float]]) -> torch.Tensor:
    """(1, D, 1, N) from N D-vectors."""
    return torch.tensor(rows).T[None, :, None, :]


def info_nce(similarities: list[float], positive: int, temperature: float) -> float:
    logits = torch.tensor(similarities, dtype=torch.float64) / temperature
    return (torch.logsumexp(logits, 0) - logits[positive]).item()


def test_forward_loss_matches_hand_computed_info_nce() -> None:
    features = feature_map([[3.0, 4.0]])  # cosines with the prototypes: 0.6, 0.8, -0.6
    values, mask = forward_contrastive_pixels(features, torch.tensor([[[0]]]), PROTOTYPES, temperature=0.5)
    assert mask.tolist() == [[[True]]]
    assert values.item() == pytest.approx(info_nce([0.6, 0.8, -0.6], 0, 0.5), rel=1e-5)


def test_forward_loss_is_lower_when_the_pixel_is_nearer_its_prototype() -> None:
    labels = torch.tensor([[[0, 0]]])
    values, mask = forward_contrastive_pixels(feature_map([[1.0, 0.1], [0.1, 1.0]]), labels, PROTOTYPES, 0.1)
    assert values[0, 0, 0] < values[0, 0, 1]
    assert masked_mean(values, mask).item() == pytest.approx(values.mean().item())


def test_backward_loss_matches_hand_value_and_order() -> None:
    target_prototypes = torch.tensor([[0.0, 2.0], [5.0, 0.0], [NAN, NAN]])  # class 2 not in the target image
    features = feature_map([[0.0, 1.0], [1.0, 1.0]])
    values, mask = backward_contrastive_pixels(features, torch.tensor([[[0, 0]]]), target_prototypes, 0.5)
    assert values[0, 0, 0].item() == pytest.approx(info_nce([1.0, 0.0], 0, 0.5), rel=1e-5)
    assert values[0, 0, 1].item() == pytest.approx(info_nce([1 / math.sqrt(2)] * 2, 0, 0.5), rel=1e-5)
    assert values[0, 0, 0] < values[0, 0, 1]


def test_ignored_pixels_and_classes_without_prototype_do_not_count() -> None:
    prototypes = torch.tensor([[1.0, 0.0], [NAN, NAN]])
    labels = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    values, mask = forward_contrastive_pixels(feature_map([[1.0, 0.0]] * 3), labels, prototypes, 0.1)
    assert mask.tolist() == [[[True, False, False]]]
    assert torch.isfinite(values).all() and masked_mean(values, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_absent_classes_stay_in_the_softmax_at_the_given_similarity() -> None:
    """Public code (DASS damnet_trainer.py:62): a class without a prototype has cosine -1 in the softmax."""
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, NAN]])
    features = feature_map([[3.0, 4.0], [1.0, 0.0]])  # cosines 0.6, 0.8 and 1, 0
    labels = torch.tensor([[[0, 2]]])  # pixel 1's class has no prototype: it does not count
    values, mask = forward_contrastive_pixels(features, labels, prototypes, 0.5, absent_similarity=-1.0)
    assert mask.tolist() == [[[True, False]]]
    assert values[0, 0, 0].item() == pytest.approx(info_nce([0.6, 0.8, -1.0], 0, 0.5), rel=1e-5)
    dropped, _ = forward_contrastive_pixels(features, labels, prototypes, 0.5, absent_similarity=None)
    assert dropped[0, 0, 0].item() == pytest.approx(info_nce([0.6, 0.8], 0, 0.5), rel=1e-5)


def test_calibration_moves_source_prototypes_by_the_domain_bias() -> None:
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, NAN]])
    source_momentum = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target_momentum = torch.tensor([[1.0, 2.0], [NAN, NAN], [0.0, 0.0]])
    calibrated = calibrated_prototypes(source, source_momentum, target_momentum)
    assert calibrated[0].tolist() == [1.0, 2.0]  # + (0, 2)
    assert calibrated[1].tolist() == [0.0, 1.0]  # mu_T unknown: no correction
    assert torch.isnan(calibrated[2]).all()  # not in the source image: no prototype


def test_dynamic_labels_need_calibration_and_the_threshold() -> None:
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = feature_map([[1.0, 1.2], [1.0, 0.9], [-1.0, -1.0]])
    plain, _ = dynamic_pseudo_labels(features, source, threshold=0.7)
    assert plain.tolist() == [[[1, 0, IGNORE_INDEX]]]
    bias = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # the target's class 0 lies higher along y
    calibrated = calibrated_prototypes(source, torch.zeros(2, 2), bias)
    labels, similarity = dynamic_pseudo_labels(features, calibrated, threshold=0.7)
    assert labels.tolist() == [[[0, 0, IGNORE_INDEX]]]  # pixel 0 moves to class 0 after calibration
    assert similarity[0, 0, 2].item() < 0.7


def test_hybrid_labels_prefer_dynamic_then_static() -> None:
    dynamic = torch.tensor([[3, IGNORE_INDEX, IGNORE_INDEX]])
    static = torch.tensor([[1, 2, IGNORE_INDEX]])
    assert hybrid_pseudo_labels(dynamic, static).tolist() == [[3, 2, IGNORE_INDEX]]
    assert hybrid_pseudo_labels(dynamic, static, "static").tolist() == [[1, 2, IGNORE_INDEX]]
    assert hybrid_pseudo_labels(dynamic, static, "static_only").tolist() == [[1, 2, IGNORE_INDEX]]
    assert hybrid_pseudo_labels(torch.tensor([[3, 4, 5]]), static, "static").tolist() == [[1, 2, 5]]
    with pytest.raises(ValueError):
        hybrid_pseudo_labels(dynamic, static, "public")


def test_entropy_and_sampling_probabilities_hand_values() -> None:
    values, _ = entropy_pixels(torch.zeros(1, 4, 1, 1))
    assert values.item() == pytest.approx(math.log(4))
    presence = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)  # p = 1, 0.5, 0
    assert class_sampling_probabilities(presence).tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_settings_default_to_the_paper_and_refuse_unknown_keys() -> None:
    settings = from_dict(ContrastiveSettings, {}, "contrastive")
    assert (settings.forward_weight, settings.backward_weight, settings.prototype_momentum,
            settings.similarity_threshold) == (0.5, 0.5, 0.999, 0.7)
    assert (settings.label_priority, settings.absent_class_similarity, settings.entropy_form,
            settings.prototype_scope, settings.prototype_gradient) == ("dynamic", -1.0, "shannon", "pair", True)
    assert from_dict(ContrastiveSettings, {"absent_class_similarity": None}, "c").absent_class_similarity is None
    with pytest.raises(SettingsError):
        from_dict(ContrastiveSettings, {"tau": 0.1}, "contrastive")
    for wrong in ({"label_priority": "hybrid"}, {"entropy_form": "renyi"}, {"prototype_scope": "image"},
                  {"absent_class_similarity": -2.0}):
        with pytest.raises(ValueError):
            ContrastiveSettings(**wrong)
