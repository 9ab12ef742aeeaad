"""Parity of ProDA stage 1 (bismap.methods.proda) with the public code, on small fixed inputs.

Every expected number was computed with the public code in a scratch environment
(microsoft/ProDA, commit 9ba80c7dbbd23ba1a126e3f4003a72f27d121a1f, models/adaptation_modelv2.py run on CPU
tensors of the same seeded inputs; the line numbers below are that file's). The public code's
``--proto_temperature`` multiplies the distances (an inverse temperature); both are 1 here.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bismap.losses import masked_mean
from bismap.methods.proda import (ProdaSettings, prototype_weights, pseudo_label_loss_pixels, rectify_pseudo_labels,
                                  regularization_pixels, structure_kl_pixels, update_prototypes)

CLASSES, DIM, BATCH, HEIGHT, WIDTH = 3, 4, 2, 4, 6


def seeded_inputs() -> dict[str, torch.Tensor]:
    """f~ and strong-view f (B, D, h, w), prototypes (K, D), logits and p_{t,0} (B, K, h, w); seed 7, float64."""
    generator = torch.Generator().manual_seed(7)
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    features, strong = normal(BATCH, DIM, HEIGHT, WIDTH), normal(BATCH, DIM, HEIGHT, WIDTH)
    prototypes = normal(CLASSES, DIM)
    logits = 2 * normal(BATCH, CLASSES, HEIGHT, WIDTH)
    soft_labels = normal(BATCH, CLASSES, HEIGHT, WIDTH).softmax(dim=1)
    return {"features": features, "strong": strong, "prototypes": prototypes, "logits": logits, "soft": soft_labels}


def test_prototype_weights_match_the_public_code() -> None:
    """Eq. 4: get_prototype_weight, lines 348-355 (raw features, Euclidean distance, softmax over -d)."""
    data = seeded_inputs()
    weights = prototype_weights(data["features"], data["prototypes"], temperature=1.0)  # (B, K, h, w)
    assert weights[0, :, 0, 0].tolist() == pytest.approx([0.17142066359519958, 0.6971989870071411,
                                                          0.1313803642988205], rel=1e-6)
    assert weights.max(dim=1).values.mean().item() == pytest.approx(0.5750329494476318, rel=1e-6)


def test_rectified_labels_match_the_public_code() -> None:
    """Eq. 3: step(), lines 210-214: argmax of omega * p_{t,0}, threshold 0 on the renormalised product."""
    data = seeded_inputs()
    weights = prototype_weights(data["features"], data["prototypes"], temperature=1.0)
    labels, confidence = rectify_pseudo_labels(data["soft"], weights, threshold=ProdaSettings().confidence_threshold)
    assert labels.tolist() == [
        [[1, 1, 2, 2, 0, 2], [1, 1, 1, 1, 2, 1], [2, 0, 1, 0, 1, 1], [1, 2, 2, 2, 1, 2]],
        [[1, 1, 2, 0, 1, 1], [1, 1, 1, 2, 1, 1], [0, 1, 1, 1, 1, 1], [1, 2, 2, 1, 2, 0]]]
    assert confidence.sum().item() == pytest.approx(31.282370736656006, rel=1e-6)
    assert int((labels != data["soft"].argmax(dim=1)).sum()) == 21  # of 48 pixels, the weights changed 21


def test_symmetric_cross_entropy_matches_the_public_code() -> None:
    """Eq. 7: step(), lines 220-224 with rce(), 278-286: 0.1 CE + 1.0 RCE on the rectified labels, both means."""
    data = seeded_inputs()
    labels, _ = rectify_pseudo_labels(data["soft"], prototype_weights(data["features"], data["prototypes"], 1.0))
    loss = masked_mean(*pseudo_label_loss_pixels(data["logits"], labels, ProdaSettings()))
    assert loss.item() == pytest.approx(6.548665124760892, rel=1e-6)


def test_prototype_update_matches_the_public_code_per_image() -> None:
    """Eq. 6: step(), lines 256-259 with calculate_mean_vector (113-141) and update_objective_SingleVector.

    One momentum step per image and class with >= 10 pixels (line 133) of the momentum encoder's argmax.
    Image 0 has 12 / 2 / 10 pixels of classes 0 / 1 / 2, image 1 has 1 / 9 / 14: class 0 moves once, class 1
    never, class 2 twice (image 0, then image 1).
    """
    data = seeded_inputs()
    labels = torch.tensor([[0] * 12 + [1] * 2 + [2] * 10, [0] * 1 + [1] * 9 + [2] * 14]).view(BATCH, HEIGHT, WIDTH)
    updated = update_prototypes(data["prototypes"], data["features"], labels, momentum=0.9999, minimum_pixels=10)
    expected_change = [[0.00019131910732550494, -0.0002015120339671217, -5.135410296136511e-05,
                        0.00019136957228482743], [0.0, 0.0, 0.0, 0.0],
                       [-0.0003173174823369873, -4.4442911278030905e-05, -0.00017956837278976234,
                        0.0005341912334633214]]
    change = (updated - data["prototypes"]).flatten().tolist()
    assert change == pytest.approx(sum(expected_change, []), rel=1e-6, abs=1e-15)
    large_step = update_prototypes(data["prototypes"], data["features"], labels, momentum=0.5, minimum_pixels=10)
    # rel 1e-6: the public code divides by its pixel share in float32 (calculate_mean_vector, line 126)
    assert large_step.tolist() == [pytest.approx(row, rel=1e-6) for row in [
        [-0.3467911252697347, 0.6021510604031377, -0.07466685643936276, -0.5742510234136952],
        [-0.9706394740647316, 1.4449765785753699, 0.5257279175932715, 0.05914700297392438],
        [0.7220432755138184, -0.18296037703057044, -0.021275060956485056, -0.27853130239074014]]]


def test_structure_kl_matches_the_public_mean_over_classes_and_pixels() -> None:
    """Eq. 8-9: step(), lines 233-248; pixel (1, 0, 0) is out of the strong view (public: distance 250, masked)."""
    data = seeded_inputs()
    valid = torch.ones(BATCH, HEIGHT, WIDTH, dtype=torch.bool)
    valid[1, 0, 0] = False
    kl = masked_mean(*structure_kl_pixels(data["features"], data["strong"], data["prototypes"], 1.0, valid))
    assert kl.item() == pytest.approx(0.08788034319877625, rel=1e-6)  # mask.sum() = 47 pixels x 3 classes = 141


def test_regularizer_matches_the_public_mean_over_classes_and_pixels() -> None:
    """Eq. 10: regular_loss ('MRKLD'), lines 269-276: -sum log p / (B K h w)."""
    logits = seeded_inputs()["logits"]
    assert masked_mean(*regularization_pixels(logits)).item() == pytest.approx(2.1358622010258808, rel=1e-6)
    summed_over_classes = -F.log_softmax(logits, dim=1).sum(dim=1).mean().item()  # Eq. 10 as printed
    assert summed_over_classes == pytest.approx(CLASSES * 2.1358622010258808, rel=1e-6)
