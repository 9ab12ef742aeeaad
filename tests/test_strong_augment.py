"""The strong view phi(x^t): geometric operations move the teacher's target with the image."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bismap.data.loading import IMAGENET_MEAN, IMAGENET_STD
from bismap.data.strong_augment import Geometry, StrongAugmentSettings, random_geometry, strong_augment

GEOMETRY_ONLY = dict(operations_per_image=0, cutout_fraction=0.0)


def shift_geometry(pixels_right: int, width: int) -> Geometry:
    """Content moves ``pixels_right`` to the right: output x samples input x - shift."""
    theta = torch.tensor([[[1.0, 0.0, -2.0 * pixels_right / width], [0.0, 1.0, 0.0]]])
    return Geometry(theta)


def test_a_shift_moves_image_teacher_map_and_labels_together():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 32, 32, generator=generator)
    geometry = shift_geometry(8, 32)
    warped = geometry.warp(image)
    assert torch.allclose(warped[..., 8:], image[..., :-8], atol=1e-5)
    assert float(warped[..., :8].abs().max()) == 0.0  # came from outside the image
    # a teacher map at a quarter of the resolution moves by 2 of its cells, the same place in the image
    teacher = F.avg_pool2d(image, 4)  # (1, 3, 8, 8)
    assert torch.allclose(geometry.warp(teacher), F.avg_pool2d(warped, 4), atol=1e-5)
    valid = geometry.valid((8, 8))
    assert valid[0, :, 2:].all() and not valid[0, :, :2].any()
    labels = torch.arange(64).view(1, 8, 8) % 11
    moved = geometry.warp_labels(labels)
    assert torch.equal(moved[..., 2:], labels[..., :-2])
    assert (moved[..., :2] == 255).all()


def test_a_mirror_flips_the_target_too():
    image = torch.randn(1, 3, 16, 16)
    mirror = Geometry(torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))
    assert torch.allclose(mirror.warp(image), image.flip(-1), atol=1e-5)
    assert torch.equal(mirror.warp_labels(torch.arange(16).view(1, 4, 4)), torch.arange(16).view(1, 4, 4).flip(-1))


def test_strong_view_without_colour_operations_is_the_warped_image():
    settings = StrongAugmentSettings(scale_range=(0.8, 1.25), translate=0.2, horizontal_flip=True, **GEOMETRY_ONLY)
    images = torch.rand(4, 3, 24, 24) * 2 - 1
    strong, geometry = strong_augment(images, settings, torch.Generator().manual_seed(3), IMAGENET_MEAN, IMAGENET_STD)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = ((geometry.warp(images) * std + mean).clamp(0, 1) - mean) / std
    assert torch.allclose(strong, expected, atol=1e-5)
    assert not torch.allclose(geometry.theta, torch.eye(2, 3).expand(4, 2, 3))  # it did move


def test_colour_operations_keep_pixels_in_place_and_are_seeded():
    settings = StrongAugmentSettings(operations_per_image=3, magnitude=1.0, cutout_fraction=0.25)
    images = torch.rand(3, 3, 16, 16)
    first, geometry = strong_augment(images, settings, torch.Generator().manual_seed(1), IMAGENET_MEAN, IMAGENET_STD)
    second, _ = strong_augment(images, settings, torch.Generator().manual_seed(1), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(first, second)
    assert torch.allclose(geometry.theta, torch.eye(2, 3).expand(3, 2, 3))  # no geometric part configured
    assert (first == 0).all(dim=1).any()  # Cutout hid a square (0 = the dataset mean)


def test_random_geometry_respects_its_ranges():
    settings = StrongAugmentSettings(scale_range=(0.5, 2.0), translate=0.1)
    theta = random_geometry(200, settings, torch.Generator().manual_seed(0)).theta
    assert float(theta[:, 0, 0].min()) >= 0.5 - 1e-6 and float(theta[:, 0, 0].max()) <= 2.0 + 1e-6
    assert float(theta[:, :, 2].abs().max()) <= 0.2 + 1e-6


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="magnitude"):
        StrongAugmentSettings(magnitude=2.0)
