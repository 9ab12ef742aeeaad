"""The strong view phi(x^t) of the consistency term (BiSMAP Eq. 12): RandAugment colour operations and Cutout.

BiSMAP Sec. 4.2 uses RandAugment [7] and Cutout [9] for phi. Here it runs on
the batch of already loaded, normalised target images, on their device:

1. a random affine warp (scale, translation, optional horizontal flip) of the
   whole image. Geometric operations change where a pixel is, so the same
   warp is returned as a :class:`Geometry` and applied to whatever the student's
   strong-view prediction is compared with (the EMA teacher's prediction on
   the un-warped image, the pseudo-labels); pixels warped in from outside the
   image are masked out of the loss;
2. ``operations_per_image`` colour operations per image, drawn uniformly from
   :data:`COLOUR_OPERATIONS`, each with a magnitude drawn uniformly from
   [0, ``magnitude``] (RandAugment with random magnitude); they leave pixel
   positions unchanged;
3. Cutout: one square, ``cutout_fraction`` of the shorter side, set to 0 in
   normalised space (the dataset mean). The hidden pixels are returned in the
   :class:`Geometry` (``hidden``), and the consistency term of Eq. 12 leaves them
   out, as the public BiSMAP code does (``models/adaptation_model.py:178`` of
   commit 8789a0d scores ``mask == False`` only).

All random draws come from the ``generator`` argument, so a seeded generator
gives the same views on every run and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from bismap.data.samples import IGNORE_INDEX


@dataclass(frozen=True)
class StrongAugmentSettings:
    operations_per_image: int = 2
    magnitude: float = 0.5  # in [0, 1]: the largest strength of a colour operation
    cutout_fraction: float = 0.25  # side of the Cutout square / shorter image side; 0 = no Cutout
    scale_range: tuple[float, float] = (1.0, 1.0)  # zoom factor of the warp; (1, 1) = none
    translate: float = 0.0  # largest shift, as a share of the image size
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.magnitude <= 1.0 or not 0.0 <= self.cutout_fraction <= 1.0:
            raise ValueError(f"strong_augment.magnitude and cutout_fraction must be in [0, 1], "
                             f"got {self.magnitude} and {self.cutout_fraction}")
        if self.operations_per_image < 0 or min(self.scale_range) <= 0 or self.translate < 0:
            raise ValueError("strong_augment: operations_per_image, translate must be >= 0 and scales > 0")


def _posterize(image: torch.Tensor, strength: float) -> torch.Tensor:
    levels = 2 ** max(1, round(8 - 4 * strength))  # 8 bits down to 4 bits
    return torch.floor(image * (levels - 1) + 0.5) / (levels - 1)


def _equalize(image: torch.Tensor, strength: float) -> torch.Tensor:
    return TF.to_dtype(TF.equalize(TF.to_dtype(image, torch.uint8, scale=True)), torch.float32, scale=True)


# Each takes an image (3, H, W) in [0, 1] and a signed strength in [-1, 1].
COLOUR_OPERATIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "identity": lambda image, strength: image,
    "autocontrast": lambda image, strength: TF.autocontrast(image),
    "equalize": _equalize,
    "brightness": lambda image, strength: TF.adjust_brightness(image, 1.0 + 0.9 * strength),
    "contrast": lambda image, strength: TF.adjust_contrast(image, 1.0 + 0.9 * strength),
    "color": lambda image, strength: TF.adjust_saturation(image, 1.0 + 0.9 * strength),
    "sharpness": lambda image, strength: TF.adjust_sharpness(image, 1.0 + 0.9 * strength),
    "hue": lambda image, strength: TF.adjust_hue(image, 0.5 * strength),
    "posterize": lambda image, strength: _posterize(image, abs(strength)),
    "solarize": lambda image, strength: TF.solarize(image, 1.0 - abs(strength)),
}


@dataclass(frozen=True)
class Geometry:
    """The affine warp of a strong view: ``theta`` (B, 2, 3) maps output to input coordinates (normalised)."""

    theta: torch.Tensor
    hidden: torch.Tensor | None = None  # (B, H, W) bool: pixels Cutout hid, at image resolution

    def warp(self, maps: torch.Tensor) -> torch.Tensor:
        """Bilinear warp of (B, C, h, w) maps (any resolution: the coordinates are normalised)."""
        grid = F.affine_grid(self.theta.to(maps), list(maps.shape), align_corners=False)
        return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def valid(self, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) bool: output pixels whose source lies inside the image."""
        ones = torch.ones(self.theta.shape[0], 1, *size, device=self.theta.device)
        return self.warp(ones)[:, 0] > 0.999

    def warp_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour warp of (B, h, w) labels; pixels from outside the image become 255."""
        grid = F.affine_grid(self.theta.to(torch.float32), [labels.shape[0], 1, *labels.shape[-2:]],
                             align_corners=False)
        shifted = labels.float().unsqueeze(1) + 1.0  # 0 = outside after zero padding
        warped = F.grid_sample(shifted, grid.to(labels.device), mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long() - 1
        return torch.where(warped < 0, torch.full_like(warped, IGNORE_INDEX), warped)

    def visible(self, size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) bool at image size: inside the image after the warp and not hidden by Cutout."""
        valid = self.valid(size)
        return valid if self.hidden is None else valid & ~self.hidden.to(valid.device)


def random_geometry(batch: int, settings: StrongAugmentSettings, generator: torch.Generator) -> Geometry:
    """Per image: zoom s, shift (tx, ty), optional mirror; theta = [[f/s, 0, tx], [0, 1/s, ty]]."""
    low, high = settings.scale_range
    scale = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)  # (B,)
    shift = (2 * torch.rand(batch, 2, generator=generator, dtype=torch.float64) - 1) * 2 * settings.translate
    flip = torch.ones(batch, dtype=torch.float64)
    if settings.horizontal_flip:
        flip = torch.where(torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = flip / scale, 1.0 / scale
    theta[:, :, 2] = shift  # normalised coordinates span 2, hence 2 * translate
    return Geometry(theta.float())


def _colour_augment(image: torch.Tensor, settings: StrongAugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """RandAugment colour part on one (3, H, W) image in [0, 1]."""
    names = list(COLOUR_OPERATIONS)
    for _ in range(settings.operations_per_image):
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        strength = settings.magnitude * float(torch.rand((), generator=generator))
        sign = 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0
        image = COLOUR_OPERATIONS[name](image, sign * strength).clamp(0.0, 1.0)
    return image


def _cutout(images: torch.Tensor, fraction: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero one square per image of (B, 3, H, W) normalised images (0 = the dataset mean).

    Returns the images and the hidden pixels (B, H, W) bool.
    """
    height, width = images.shape[-2:]
    hidden = torch.zeros(images.shape[0], height, width, dtype=torch.bool, device=images.device)
    side = round(fraction * min(height, width))
    if side == 0:
        return images, hidden
    images = images.clone()
    for index in range(images.shape[0]):
        top = int(torch.randint(-side // 2, height - side // 2, (1,), generator=generator))
        left = int(torch.randint(-side // 2, width - side // 2, (1,), generator=generator))
        images[index, :, max(top, 0):top + side, max(left, 0):left + side] = 0.0
        hidden[index, max(top, 0):top + side, max(left, 0):left + side] = True
    return images, hidden


def strong_augment(images: torch.Tensor, settings: StrongAugmentSettings, generator: torch.Generator,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, Geometry]:
    """phi(x) for a batch of normalised images (B, 3, H, W) -> (strong view (B, 3, H, W), its Geometry)."""
    geometry = random_geometry(images.shape[0], settings, generator)
    geometry = Geometry(geometry.theta.to(images.device))
    mean_tensor = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    pixels = (geometry.warp(images) * std_tensor + mean_tensor).clamp(0.0, 1.0)  # (B, 3, H, W) in [0, 1]
    pixels = torch.stack([_colour_augment(image, settings, generator) for image in pixels])
    strong = (pixels - mean_tensor) / std_tensor
    strong, hidden = _cutout(strong, settings.cutout_fraction, generator)
    return strong, Geometry(geometry.theta, hidden)
