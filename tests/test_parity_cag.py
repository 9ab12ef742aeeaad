"""CAG-UDA parity with the public code (RogerZhangzz/CAG_UDA, commit 422f99e).

Every expected number here was computed with the public code in a scratch
environment (its function bodies run on CPU with ``.cuda()`` a no-op; only the
hard-coded feature shape of ``CustomMetrics.update`` was set to the input's),
on inputs built exactly as below.
"""

from __future__ import annotations

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import masked_mean
from bismap.methods.cag import anchor_distance_pairs, anchor_pseudo_labels, probability_pseudo_labels

X = IGNORE_INDEX  # the public code writes 250 for these pixels


def label_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target features near random anchors (2, 4, 5, 6), 19 anchors (19, 4), logits (2, 19, 5, 6)."""
    generator = torch.Generator().manual_seed(0)
    anchors = 3.0 * torch.randn(19, 4, generator=generator)  # (K, D)
    classes = torch.randint(0, 19, (2, 5, 6), generator=generator)
    features = anchors[classes].permute(0, 3, 1, 2) + 0.7 * torch.randn(2, 4, 5, 6, generator=generator)
    logits = 4.0 * torch.randn(2, 19, 5, 6, generator=generator)  # (B, K, h, w)
    return features, anchors, logits


def distance_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (2, 4, 6, 8), labels in {0, 1, 2, 5, 255} (2, 6, 8), logits agreeing on ~80%, anchors (19, 4)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 6, 8, generator=generator)
    labels = torch.randint(0, 3, (2, 6, 8), generator=generator)
    labels[1, 4:, 5:] = 5  # 6 pixels of class 5: under the 10-pixel minimum
    labels[:, 0, :4] = IGNORE_INDEX
    agree = torch.rand(2, 6, 8, generator=generator) < 0.8
    logits = torch.randn(2, 19, 6, 8, generator=generator)
    boost = torch.nn.functional.one_hot(labels.clamp(max=18), 19).permute(0, 3, 1, 2).float()
    logits = logits + 6.0 * boost * agree[:, None]
    anchors = 0.5 * torch.randn(19, 4, generator=generator)
    anchors[2] += 8.0  # class 2's SmoothL1 is above 5: the public code divides it by 10
    return features, labels, logits, anchors


# public code: models/adaptation_model.py:58-70 (CustomMetrics.update, cluster_arg), Delta_d = 2.5
ANCHOR_LABELS_2_5 = [[[11, 2, X, 1, 11, X], [X, 13, 5, X, 7, 2], [X, 5, 9, X, X, 5], [X, X, 14, 5, 1, X],
                      [13, X, X, 1, 14, X]],
                     [[X, X, 14, 3, X, X], [X, 11, X, X, 4, X], [14, X, 18, X, 1, X], [0, X, 0, X, 14, 1],
                      [18, X, X, X, 7, X]]]
# public code: models/adaptation_model.py:40-51 (CustomMetrics.update, threshold_arg), P_0 = 0.95
PROBABILITY_LABELS = [[[X, X, 13, X, 13, X], [X, X, X, X, 5, 12], [X] * 6, [X] * 6, [X] * 6],
                      [[X, X, X, 14, X, X], [X, X, X, X, X, 0], [X] * 6, [0, X, X, X, X, X], [X, X, 16, 9, X, 8]]]


def test_active_anchor_labels_match_the_public_code() -> None:
    """Eq. 5-7: Euclidean distance (torch.norm, adaptation_model.py:61), nearest minus second-nearest vs Delta_d.

    The public code keeps a pixel when gap >= Delta_d (it drops gap < Delta_d,
    adaptation_model.py:70); the project keeps gap > Delta_d (Eq. 6). No gap of
    this input is within 0.015 of either margin, so both agree.
    """
    features, anchors, _ = label_inputs()
    labels, _ = anchor_pseudo_labels(features, anchors, margin=2.5)
    assert labels.tolist() == ANCHOR_LABELS_2_5
    labels, _ = anchor_pseudo_labels(features, anchors, margin=2.0)  # the project's margin
    assert int((labels != IGNORE_INDEX).sum()) == 35  # public code: 35 active pixels (30 at 2.5)
    assert labels[1, 1].tolist() == [13, 11, 7, X, 4, X] and labels[1, 4].tolist() == [18, 0, X, X, 7, 17]


def test_probability_labels_match_the_public_code() -> None:
    """Eq. 11: softmax > 0.95 (strict, adaptation_model.py:44), else ignored; 10 of 60 pixels kept."""
    _, _, logits = label_inputs()
    labels, _ = probability_pseudo_labels(logits, threshold=0.95)
    assert labels.tolist() == PROBABILITY_LABELS


def test_distance_loss_and_gradient_match_the_public_code() -> None:
    """Eq. 8 / 10 as the public code computes them (adaptation_model.py:239-260, 318-329; models/utils.py:17-34).

    Pairs (image, class) with >= 10 pixels labelled and predicted c: image 0
    classes 0, 1, 2 and image 1 classes 0, 1 (class 5's 6 pixels and image 1's
    class 2 do not count). Public loss 3.154498338699341; the gradient is the
    public one including the 2 n_c / (h w) scaling of NormalisationPoolingFunction.
    """
    features, labels, logits, anchors = distance_inputs()
    features.requires_grad_(True)
    values, pairs = anchor_distance_pairs(features, labels, logits, anchors)
    assert torch.nonzero(pairs).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    loss = masked_mean(values, pairs)
    assert loss.item() == pytest.approx(3.154498338699341, rel=1e-6)
    assert values[0, 2].item() == pytest.approx(7.3862982, rel=1e-6)  # its SmoothL1 7.386 > 5: / 10, then x 10
    loss.backward()
    assert features.grad[0, :, 1, 1].tolist() == pytest.approx(
        [-0.008438389748334885, -0.007181946653872728, 0.0018518040888011456, 0.01730765588581562], rel=1e-5)
    assert features.grad[1, :, 5, 7].tolist() == [0.0, 0.0, 0.0, 0.0]  # class 5: no pair
    assert features.grad.abs().sum().item() == pytest.approx(2.296966314315796, rel=1e-5)
