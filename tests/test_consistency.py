"""BiSMAP Eq. 12 as the public code computes it: KL averaged over pixels and classes, Cutout pixels left out,
lambda ramped up as exp(-5 (1 - t)^2), the teacher on the target batch's BatchNorm statistics."""

from __future__ import annotations

import math

import pytest
import torch

from bismap.data.strong_augment import Geometry, StrongAugmentSettings, strong_augment
from bismap.training.ema import make_teacher, use_batch_statistics
from bismap.training.optim import OptimizerSettings
from bismap.training.selftrain import SelfTrainSettings, SelfTrainStep, consistency_rampup
from bismap.training.supervised import TrainSettings

IDENTITY = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (1, 2, 3): no warp


def settings(**overrides) -> SelfTrainSettings:
    training = TrainSettings(iterations=1000, batch_size=1, optimizer=OptimizerSettings(learning_rate=0.01))
    return SelfTrainSettings(training=training, **overrides)


def consistency(teacher_probabilities: torch.Tensor, student_logits: torch.Tensor, geometry: Geometry) -> float:
    step = SelfTrainStep(torch.nn.Identity(), None, None, settings())
    return float(step._consistency_loss(teacher_probabilities, student_logits, geometry))


def test_the_ramp_is_the_public_codes_exp_of_minus_five_phase_squared():
    ramped = settings(consistency_rampup=0.004)  # 4 of 1,000 iterations
    assert [consistency_rampup(t, ramped) for t in (0, 1, 2, 4, 10)] == pytest.approx(
        [math.exp(-5.0), math.exp(-5.0 * 0.5625), math.exp(-1.25), 1.0, 1.0])
    assert consistency_rampup(0, settings()) == 1.0  # no ramp: lambda from the start


def test_the_kl_is_averaged_over_classes_and_cutout_pixels_do_not_count():
    teacher = torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()  # (1, K=3, 2, 2)
    student = torch.zeros(1, 3, 2, 2)  # uniform softmax everywhere but the hidden pixel
    student[0, :, 0, 0] = torch.tensor([-5.0, 5.0, 0.0])  # a large KL where Cutout hid the image
    hidden = torch.zeros(1, 2, 2, dtype=torch.bool)
    hidden[0, 0, 0] = True
    per_pixel = sum(p * math.log(p * 3) for p in (0.7, 0.2, 0.1))  # KL(teacher || uniform), summed over classes
    assert consistency(teacher, student, Geometry(IDENTITY, hidden)) == pytest.approx(per_pixel / 3, rel=1e-5)
    counted = consistency(teacher, student, Geometry(IDENTITY))  # without the Cutout mask the hidden pixel counts
    assert counted > per_pixel / 3 + 0.5


def test_cutout_returns_the_pixels_it_hid():
    images = torch.ones(2, 3, 8, 8)
    strong, geometry = strong_augment(images, StrongAugmentSettings(operations_per_image=0, cutout_fraction=0.5),
                                      torch.Generator().manual_seed(0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.equal(geometry.hidden, strong[:, 0] == 0.0)
    assert geometry.hidden.sum(dim=(1, 2)).tolist() == [12, 8]  # a 4 x 4 square, partly outside the image


def test_a_batch_statistics_teacher_normalises_with_the_batch_and_keeps_its_running_statistics():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    student[1].running_mean.fill_(5.0)
    teacher = use_batch_statistics(make_teacher(student))
    images = torch.randn(2, 3, 4, 4)
    output = teacher(images)  # (2, 4, 4, 4)
    assert output.mean(dim=(0, 2, 3)).abs().max() < 1e-6  # normalised with this batch's own mean
    assert output.var(dim=(0, 2, 3), unbiased=False).sub(1.0).abs().max() < 1e-3
    assert teacher[1].running_mean.tolist() == [5.0] * 4  # momentum 0: the EMA's statistics stay
    assert not teacher[0].training and not any(p.requires_grad for p in teacher.parameters())
