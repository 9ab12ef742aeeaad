"""Each adaptation loss against a hand-computed value on tiny tensors, and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.losses import kl_divergence, symmetric_cross_entropy, weighted_cross_entropy
from bismap.training.ema import make_teacher, update_ema


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    """Pixels' class probabilities (N, K) -> logits (1, K, 1, N) whose softmax gives them back."""
    return torch.tensor(probabilities, dtype=torch.float64).log().T[None, :, None, :]


def labels_of(values: list[int]) -> torch.Tensor:
    return torch.tensor(values)[None, None, :]  # (1, 1, N)


def test_weighted_cross_entropy_by_hand():
    logits = logits_of([[0.25, 0.75], [0.25, 0.75], [0.5, 0.5]])
    labels = labels_of([1, 0, 255])
    weights = torch.tensor([[[0.5, 1.0, 0.9]]])
    # (-0.5 ln 0.75 - 1.0 ln 0.25) / 2 labelled pixels: the ignored one adds nothing, weights do not renormalise
    expected = (0.5 * -math.log(0.75) + -math.log(0.25)) / 2
    assert float(weighted_cross_entropy(logits, labels, weights)) == pytest.approx(expected, abs=1e-6)
    plain = (-math.log(0.75) - math.log(0.25)) / 2
    assert float(weighted_cross_entropy(logits, labels)) == pytest.approx(plain, abs=1e-6)


def test_symmetric_cross_entropy_by_hand():
    logits = logits_of([[0.25, 0.75], [0.9, 0.1]])
    labels = labels_of([1, 255])
    # alpha * -ln p_y + beta * -(sum_c p_c ln clamp(y_c)) = 0.1 * -ln 0.75 + 1.0 * -(0.25 ln 1e-4 + 0.75 ln 1)
    expected = 0.1 * -math.log(0.75) + 0.25 * -math.log(1e-4)
    assert float(symmetric_cross_entropy(logits, labels, alpha=0.1, beta=1.0)) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(2.331353, abs=1e-6)


def test_symmetric_cross_entropy_of_only_ignored_pixels_is_zero():
    logits = logits_of([[0.25, 0.75]])
    assert float(symmetric_cross_entropy(logits, labels_of([255]), alpha=0.1, beta=1.0)) == 0.0


def test_kl_divergence_by_hand_and_its_properties():
    teacher = logits_of([[0.5, 0.5]])
    student = logits_of([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841
    assert float(kl_divergence(teacher, student)) == pytest.approx(expected, abs=1e-6)
    assert float(kl_divergence(student, student)) == pytest.approx(0.0, abs=1e-7)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        first, second = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
        assert float(kl_divergence(first, second)) > 0.0


def test_kl_divergence_is_not_symmetric_and_masks_pixels():
    teacher, student = logits_of([[0.5, 0.5], [0.9, 0.1]]), logits_of([[0.25, 0.75], [0.9, 0.1]])
    first_pixel_only = torch.tensor([[[True, False]]])
    assert float(kl_divergence(teacher, student, first_pixel_only)) == pytest.approx(0.143841, abs=1e-6)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(student || teacher)
    assert float(kl_divergence(student, teacher, first_pixel_only)) == pytest.approx(reverse, abs=1e-6)


def test_kl_divergence_sends_no_gradient_to_the_teacher():
    teacher = torch.randn(1, 3, 2, 2, requires_grad=True)
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    kl_divergence(teacher, student).backward()
    assert teacher.grad is None and float(student.grad.abs().sum()) > 0


def small_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


def test_ema_with_decay_zero_copies_the_student():
    student = small_network()
    teacher = make_teacher(student)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    student.train()(torch.randn(2, 3, 4, 4))  # moves the BatchNorm running statistics
    update_ema(teacher, student, decay=0.0)
    for name, value in student.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_ema_averages_with_the_given_decay():
    student = small_network()
    teacher = make_teacher(student)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    with torch.no_grad():
        student[0].weight.add_(2.0)
    update_ema(teacher, student, decay=0.75)
    assert torch.allclose(teacher[0].weight, before["0.weight"] + 0.25 * 2.0)
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    with pytest.raises(ValueError, match="1.5"):
        update_ema(teacher, student, decay=1.5)
