"""CPSL parity with the public code (github.com/lslrh/CPSL, models/adaptation_modelv2.py and models/utils.py).

Every expected number below was computed with the public code in a scratch environment (its functions called on
CPU tensors, the inline parts of ``CustomModel.step`` re-run line for line, features zero-padded to its hard-coded
D = 256, which leaves every cosine unchanged), on the inputs that :func:`inputs` builds from a seeded generator.
The public checkout carries no commit id; it is the repository's published training code for the CVPR 2022 paper.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import masked_mean
from bismap.methods.cpsl import (CpslSettings, cluster_logits, cluster_probabilities, consistency_pixels,
                                 online_assignments, output_rows, self_labeling_loss_pixels, self_labeling_scores,
                                 target_label_pixels)
from bismap.methods.proda import rectify_pseudo_labels

CLASSES, DIM = 4, 3
SHARES = torch.tensor([0.5, 0.25, 0.15, 0.1])  # r = delta_pseudo
EPSILON, TEMPERATURE, ITERATIONS = 0.05, 0.08, 3  # the paper's epsilon and tau, the public default iterations


def inputs() -> dict[str, torch.Tensor]:
    """Small fixed inputs, in the order the scratch script drew them."""
    generator = torch.Generator().manual_seed(2022)
    draw = {"scores": torch.rand(6, CLASSES, generator=generator) * 2 - 1,  # (6, K) cosines
            "memory_scores": torch.rand(10, CLASSES, generator=generator) * 2 - 1,  # (10, K)
            "head": F.normalize(torch.randn(CLASSES, DIM, generator=generator), dim=1),  # (K, D) unit rows
            "features": F.normalize(torch.randn(5, DIM, generator=generator), dim=1),  # (M, D) momentum features
            "memory": F.normalize(torch.randn(10, DIM, generator=generator), dim=1),  # (L, D)
            "logits": torch.randn(5, CLASSES, generator=generator) * 3,  # (M, K) momentum logits
            "output_memory": F.normalize(torch.randn(10, CLASSES, generator=generator), dim=1)}  # (L, K)
    draw["weak_features"] = torch.randn(1, DIM, 2, 3, generator=generator)  # (B, D, h, w)
    draw["strong_features"] = torch.randn(1, DIM, 2, 3, generator=generator)
    draw["soft_labels"] = torch.rand(1, CLASSES, 2, 3, generator=generator).softmax(dim=1)  # P_ST
    draw["segmentation"] = torch.randn(1, CLASSES, 2, 3, generator=generator) * 2  # student logits
    return draw


# Sinkhorn without and with the memory bank: (6, K) expected assignments of the current rows
SINKHORN_EXPECTED = {
    None: [[2.46526724e-07, 9.90297437e-01, 9.70232021e-03, 3.65911070e-08],
           [2.58200714e-13, 4.60460725e-10, 1.06518582e-01, 8.93481493e-01],
           [1.36605818e-02, 3.37307081e-02, 9.52608466e-01, 3.12451192e-07],
           [9.97392535e-01, 2.15784647e-04, 2.37478036e-03, 1.67788839e-05],
           [4.85819280e-02, 9.50833440e-01, 5.84620051e-04, 2.92345419e-11],
           [9.37108994e-01, 5.69956273e-14, 6.28909618e-02, 3.01883389e-08]],
    "memory_scores": [[8.94243684e-08, 9.97631013e-01, 2.36889697e-03, 2.61887456e-11],
                      [3.51482797e-12, 1.74081105e-08, 9.76001740e-01, 2.39982381e-02],
                      [1.82496868e-02, 1.25148043e-01, 8.56602311e-01, 8.23598523e-10],
                      [9.97801304e-01, 5.99530002e-04, 1.59911579e-03, 3.31198358e-08],
                      [1.80624668e-02, 9.81791198e-01, 1.46303471e-04, 2.14459730e-14],
                      [9.56779659e-01, 1.61612775e-13, 4.32203822e-02, 6.08146727e-11]],
}


@pytest.mark.parametrize("memory", [None, "memory_scores"])
def test_sinkhorn_assignments_match_the_public_code(memory: str | None) -> None:
    """CPSL Eq. 6, 12: Q over [memory; current], the current rows kept. Public: adaptation_modelv2.py:403-424
    (sinkhorn, linear domain, r = class_distribution) and :264-273 (with the queue)."""
    data = inputs()
    assignments = online_assignments(data["scores"], data[memory] if memory else None, SHARES, EPSILON,
                                     ITERATIONS)  # (6, K)
    assert torch.allclose(assignments, torch.tensor(SINKHORN_EXPECTED[memory]), atol=2e-6)


def test_rectified_labels_match_the_public_code() -> None:
    """CPSL Eq. 1: argmax(P_SL * P_ST), P_SL = softmax(cos(z, f'_SL) / tau).

    Public: adaptation_modelv2.py:227-230 with get_prototype_weight at :486-496 (identity weak-view crop).
    The rectification changes 3 of the 6 labels of argmax P_ST = [1, 1, 2, 0, 2, 3].
    """
    data = inputs()
    weights = cluster_probabilities(data["weak_features"], data["head"], TEMPERATURE)  # (1, K, 2, 3)
    labels, _ = rectify_pseudo_labels(data["soft_labels"], weights)
    assert data["soft_labels"].argmax(dim=1).flatten().tolist() == [1, 1, 2, 0, 2, 3]
    assert labels.flatten().tolist() == [3, 2, 2, 0, 2, 2]


def test_self_labeling_loss_and_its_gradient_match_the_public_code() -> None:
    """CPSL Eq. 5 with the public code's two targets, on momentum features, the head alone receiving the gradient.

    Public: adaptation_modelv2.py:258-277 (q from the head's scores over [queue; current]) plus :279-298 (q from
    the momentum network's L2-normalised logits over [queue_out; current]); one image, full queues. The public
    code scores the queue with the UN-normalised prototypes (:267); the head here has unit rows, as the public
    code initialises it (train.py:49), so both readings agree on this input.
    Feature term 0.98877925, output term 5.61555481, sum 6.60433388.
    """
    data = inputs()
    head = data["head"].clone().requires_grad_(True)
    scores = self_labeling_scores(data["features"], head)  # (M, K)
    feature_targets = online_assignments(self_labeling_scores(data["features"], head.detach()),
                                         self_labeling_scores(data["memory"], head.detach()), SHARES, EPSILON,
                                         ITERATIONS)
    logits_map = data["logits"].T.reshape(1, CLASSES, 1, 5)  # (1, K, 1, M)
    output_targets = online_assignments(output_rows(logits_map, [torch.arange(5)]), data["output_memory"], SHARES,
                                        EPSILON, ITERATIONS)
    feature_term = masked_mean(*self_labeling_loss_pixels(scores, feature_targets, TEMPERATURE))
    output_term = masked_mean(*self_labeling_loss_pixels(scores, output_targets, TEMPERATURE))
    assert feature_term.item() == pytest.approx(0.9887792468070984, rel=1e-5)
    assert output_term.item() == pytest.approx(5.6155548095703125, rel=1e-5)
    (feature_term + output_term).backward()
    expected_gradient = torch.tensor([[-3.48601413, -1.46582353, 2.77438211],
                                      [-1.21340752, -4.02290201, -0.93298352],
                                      [7.04243422, 4.91459751, 2.55472708],
                                      [-0.17865400, -0.23080054, 0.08083381]])
    assert torch.allclose(head.grad, expected_gradient, rtol=1e-4, atol=1e-5)


def test_consistency_matches_the_public_code() -> None:
    """CPSL Eq. 13 as the public code computes it: F.kl_div(log P_s, P_w) masked, divided by K x pixels.

    Public: adaptation_modelv2.py:321-345 (momentum head for both views, the strong view here the weak view
    with pixel (0, 0) cut out). Public number 1.8198187; the paper's symmetric KL summed over classes (the
    project's former reading) gives 12.7913 on this input, 7.0 times more (about 2K, K = 4).
    """
    data = inputs()
    weak = cluster_logits(data["weak_features"], data["head"], TEMPERATURE)  # (1, K, 2, 3)
    strong = cluster_logits(data["strong_features"], data["head"], TEMPERATURE)
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    mask[0, 0, 0] = False
    assert masked_mean(*consistency_pixels(weak, strong, mask)).item() == pytest.approx(1.8198187351226807,
                                                                                     rel=1e-5)


def test_target_label_loss_matches_the_public_symmetric_cross_entropy() -> None:
    """L_SEG^t as the public code trains it (--rce): 0.1 CE + 1.0 RCE, one pixel ignored.

    Public: adaptation_modelv2.py:240 (cross_entropy2d, models/utils.py:67), :300-302 and rce() at :372-380.
    CE 1.59868276, RCE 5.58558321, total 5.74545145.
    """
    data = inputs()
    labels = torch.tensor([[[0, 1, IGNORE_INDEX], [3, 2, 1]]])  # the public code's ignore value is 250
    value = masked_mean(*target_label_pixels(data["segmentation"], labels, CpslSettings()))
    assert value.item() == pytest.approx(5.7454514503479, rel=1e-5)
    plain = masked_mean(*target_label_pixels(data["segmentation"], labels,
                                             CpslSettings(target_ce_weight=1.0, target_reverse_ce_weight=0.0)))
    assert plain.item() == pytest.approx(1.5986827611923218, rel=1e-5)
