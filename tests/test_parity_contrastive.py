"""Parity of bismap.methods.contrastive with the public code of the bi-directional contrastive paper (003).

Public code: cvlab-yonsei/DASS, commit f544686cc332b26c35e18a5d51c954e2b2f0210b, trainer/damnet_trainer.py.
The expected numbers were computed with the public code in a scratch environment: its ``Trainer.metric_loss``
(lines 39-112) and ``Trainer.entropy_loss`` (lines 33-37) run on CPU on the inputs below, with
lamb_metric1 / lamb_metric2 set to (1, 0) for FCL and (0, 1) for BCL; the dynamic and hybrid labels are the
function's locals ``masked_target_predicted_resize`` (line 81) and ``label_t_resize_new`` (line 84). The public
code fixes 19 classes (line 54), so the prototypes here have 19 rows. Features and labels have the same size, so
the public code's nearest resizing (lines 41, 44, 63, 103) is the identity.
"""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.samples import IGNORE_INDEX as NO
from bismap.losses import masked_mean
from bismap.methods.contrastive import (backward_contrastive_pixels, calibrated_prototypes, dynamic_pseudo_labels,
                                        entropy_pixels, forward_contrastive_pixels, hybrid_pseudo_labels)
from bismap.methods.prototypes import class_centroids

CLASSES = 19
SOURCE_FEATURES = torch.tensor([[[1.0, 0.5, 0.0], [2.0, 0.2, 0.1]],
                                [[0.2, 1.0, 0.3], [0.1, 1.5, 0.0]],
                                [[0.0, 0.1, 1.0], [0.3, 0.0, 2.0]]])[None]  # (1, D=3, 2, 3)
SOURCE_LABELS = torch.tensor([[[0, 1, 2], [0, 1, NO]]])  # y_S; class 2 has no pixel in the target's static labels
TARGET_FEATURES = torch.tensor([[[0.9, 0.1, 0.4], [1.0, 0.0, 0.2]],
                                [[0.3, 1.2, 0.5], [0.0, 0.8, 0.1]],
                                [[0.1, 0.2, 0.6], [0.2, 0.1, 0.1]]])[None]  # (1, 3, 2, 3)
STATIC_LABELS = torch.tensor([[[0, 1, NO], [3, NO, NO]]])  # y_F; class 3 is not in the source image


def source_prototypes() -> torch.Tensor:
    return class_centroids(SOURCE_FEATURES, SOURCE_LABELS, CLASSES)  # rho_S (19, 3), Eq. 1


def test_forward_term_matches_the_public_code() -> None:
    """FCL on the static labels (what the public code uses, line 108): 0.010600337758660316.

    Only the pixels of classes 0 and 1 count (public class weights, lines 66-71); absent classes stay in the
    softmax at similarity -1 (line 62). With absent classes out of the softmax (None) the 16 terms exp(-10) are
    gone; at tau = 0.1 that changes the mean by less than 1e-6.
    """
    values = forward_contrastive_pixels(TARGET_FEATURES, STATIC_LABELS, source_prototypes(), 0.1, -1.0)
    assert values[1].tolist() == [[[True, True, False], [False, False, False]]]
    assert masked_mean(*values).item() == pytest.approx(0.010600337758660316, rel=1e-6)
    dropped = forward_contrastive_pixels(TARGET_FEATURES, STATIC_LABELS, source_prototypes(), 0.1, None)
    assert masked_mean(*dropped).item() == pytest.approx(0.010600337758660316, rel=1e-4)


def test_backward_term_matches_the_public_code() -> None:
    """BCL with rho_T from the static labels (line 97) and y_S (line 109, ``prototype_loss`` with the class
    weights, so the class-2 source pixel does not count): 0.3942370116710663."""
    target_prototypes = class_centroids(TARGET_FEATURES, STATIC_LABELS, CLASSES)  # rho_T
    values = backward_contrastive_pixels(SOURCE_FEATURES, SOURCE_LABELS, target_prototypes, 0.1, -1.0)
    assert values[1].tolist() == [[[True, True, False], [True, True, False]]]
    assert masked_mean(*values).item() == pytest.approx(0.3942370116710663, rel=1e-6)


def test_dynamic_labels_differ_from_the_public_code_only_by_its_index_threshold() -> None:
    """Public (lines 73-80): argmax of the uncalibrated cosines [[0, 1, 2], [0, 1, 0]], then the mask compares
    the column-wise maximum argmax INDEX with 0.8, so column 0 (argmax 0 in both rows) becomes 255:
    [[255, 1, 2], [255, 1, 0]]. The project follows Eq. 8: every best cosine here exceeds T = 0.7 (deviation)."""
    labels, best = dynamic_pseudo_labels(TARGET_FEATURES, source_prototypes(), threshold=0.7)
    assert labels.tolist() == [[[0, 1, 2], [0, 1, 0]]]
    public_best = [0.9756792187690735, 0.9743466377258301, 0.8186582326889038,
                   0.9903379678726196, 0.9595939517021179, 0.8892973065376282]  # max over classes of line 61
    assert best.flatten().tolist() == pytest.approx(public_best, rel=1e-6)


def test_calibrated_dynamic_labels_hand_computation() -> None:
    """Eq. 6-9 (no public computation: the public code has no mu_S, mu_T or calibration).

    xi(0) = (0, 0.5, 0.5) moves rho_S(0) = (1.5, 0.15, 0.15) to (1.5, 0.65, 0.65); the pixel (0.4, 0.5, 0.6)
    then has cosine 1.315 / (sqrt(0.77) sqrt(3.095)) = 0.851822 with class 0, above 0.75 / (sqrt(0.77)
    sqrt(1.09)) = 0.818660 with class 2: its label turns from 2 to 0. With T = 0.9 it is dropped.
    """
    rho = source_prototypes()
    source_momentum = torch.full_like(rho, math.nan)
    source_momentum[:3] = rho[:3]
    target_momentum = torch.full_like(rho, math.nan)
    target_momentum[0] = rho[0] + torch.tensor([0.0, 0.5, 0.5])  # mu_T of classes 1, 2 unknown: xi = 0
    calibrated = calibrated_prototypes(rho, source_momentum, target_momentum)
    labels, best = dynamic_pseudo_labels(TARGET_FEATURES, calibrated, threshold=0.7)
    assert labels.tolist() == [[[0, 1, 0], [0, 1, 0]]]
    assert best[0, 0, 2].item() == pytest.approx(1.315 / (math.sqrt(0.77) * math.sqrt(3.095)), rel=1e-6)
    strict, _ = dynamic_pseudo_labels(TARGET_FEATURES, calibrated, threshold=0.9)
    assert strict.tolist() == [[[0, 1, NO], [0, 1, 0]]]


def test_hybrid_labels_public_static_first_and_eq_10_dynamic_first() -> None:
    """Public ``label_t_resize_new`` (lines 83-84, static first): [[0, 1, 2], [3, 1, 0]] (its dynamic labels'
    255 in column 0 are covered by static labels). Eq. 10 (dynamic first, the project's default) puts the
    dynamic 0 over the static 3; "static_only" is what the public losses use (lines 97, 108-109)."""
    dynamic, _ = dynamic_pseudo_labels(TARGET_FEATURES, source_prototypes(), threshold=0.7)
    assert hybrid_pseudo_labels(dynamic, STATIC_LABELS, "static").tolist() == [[[0, 1, 2], [3, 1, 0]]]
    assert hybrid_pseudo_labels(dynamic, STATIC_LABELS, "dynamic").tolist() == [[[0, 1, 2], [0, 1, 0]]]
    assert hybrid_pseudo_labels(dynamic, STATIC_LABELS, "static_only").tolist() == STATIC_LABELS.tolist()


def test_entropy_term_public_form_and_shannon() -> None:
    """Public entropy_loss (lines 33-37, log_softmax of the probabilities), mean over pixels: 0.9367291927337646
    (pixels 0.7748460 and log 3). The project's default is the Shannon entropy of Eq. 11 (deviation):
    (0.5242666 + log 3) / 2 = 0.8114394545555115. Both sum over classes and average over pixels (no log C)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]).T[None, :, None, :]  # (1, 3, 1, 2)
    public = entropy_pixels(logits, form="public")
    assert masked_mean(*public).item() == pytest.approx(0.9367291927337646, rel=1e-6)
    shannon = entropy_pixels(logits)
    assert masked_mean(*shannon).item() == pytest.approx(0.8114394545555115, rel=1e-6)
    assert shannon[0][0, 0, 1].item() == pytest.approx(math.log(3), rel=1e-6)
