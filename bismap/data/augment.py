"""The training augmentation: random scale, crop (padded), flip and colour jitter on plain tensors.

:class:`TrainAugmentation` calls torchvision's kernels
(``torchvision.transforms.v2.functional.*_image``) directly on plain uint8
tensors: no ``v2.Compose``, no tv_tensors wrapping, no pytree flattening, a
small share of what the former ``v2.Compose`` of transforms cost per sample.

What it matches: the former pipeline, ``v2.Compose([RandomScale,
v2.RandomCrop(pad_if_needed=True), v2.RandomHorizontalFlip(0.5),
v2.ColorJitter])`` over ``tv_tensors.Image`` / ``tv_tensors.Mask``, draw for
draw and kernel for kernel. The random numbers are drawn from the same
generator in the same order with the same calls (scale ``rand``; crop
``randint`` for the top, then the left offset, each only where the size
differs from the crop; flip ``rand(1) < 0.5``; jitter ``randperm(4)``, then
one ``uniform_`` per active adjustment), and the same kernels run on the same
uint8 values, so for one seed an item is the one the former pipeline built
(the tests check this bit for bit). Hence the distributions are torchvision's:

* scale: one factor uniform in ``scale_range`` for image and masks; size
  ``max(1, round(side * factor))``; image bilinear with antialias (uint8),
  masks nearest;
* crop: a uniform window of ``crop_size``; a side shorter than the crop is
  padded on both sides by the shortfall first (``pad_if_needed``), i.e. the
  image lands at a uniform offset in ``[0, shortfall]``; fill 0 for the image,
  ``IGNORE_INDEX`` for the label and the weights (the dataset zeroes weights
  on ignore pixels afterwards);
* flip: with probability 0.5, image and masks together;
* colour jitter (image only, on uint8, rounding as torchvision does): the four
  adjustments in a random order each sample, factors uniform in
  ``[max(0, 1 - v), 1 + v]`` for brightness, contrast and saturation and in
  ``[-h, h]`` for hue; a zero entry is skipped without a draw.

Work that is a no-op is skipped: no resize when the drawn size equals the
image size, no crop or padding when the image already has the crop size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bismap.data.samples import IGNORE_INDEX

# fn_idx of torchvision's ColorJitter: 0 brightness, 1 contrast, 2 saturation, 3 hue
_JITTER_KERNELS = (F.adjust_brightness_image, F.adjust_contrast_image, F.adjust_saturation_image,
                   F.adjust_hue_image)


@dataclass(frozen=True)
class AugmentSettings:
    crop_size: tuple[int, int] = (512, 896)  # (height, width)
    scale_range: tuple[float, float] = (0.5, 1.5)
    horizontal_flip: bool = True
    # brightness, contrast, saturation, hue, as torchvision's ColorJitter
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)


@dataclass(frozen=True)
class _Span:
    """The crop along one axis as padding: ``before`` / ``after`` pixels added (negative: removed) at each end."""

    before: int
    after: int


@dataclass(frozen=True)
class AugmentParams:
    """The random draws of one sample (what :meth:`TrainAugmentation.draw` returns)."""

    size: tuple[int, int]  # scaled (height, width)
    rows: _Span
    columns: _Span
    flip: bool
    jitter: tuple[tuple[int, float], ...]  # (kernel index, factor) in the order applied


class TrainAugmentation:
    """Random scale, crop (padded with ignore), flip and colour jitter of an image and its masks together.

    Call it with a uint8 image (3, H, W), a uint8 label (H, W), optional
    float32 weights (H, W) and the generator to draw from; it returns the
    three, (3, h, w), (h, w), (h, w) with (h, w) = ``crop_size``, never
    modifying its inputs in place. See the module docstring for what it matches.
    """

    def __init__(self, settings: AugmentSettings) -> None:
        self.settings = settings
        # torchvision's own parsing of the jitter ranges: (low, high) or None for a zero entry
        jitter = v2.ColorJitter(*settings.color_jitter) if any(settings.color_jitter) else None
        self.jitter_ranges = None if jitter is None else (jitter.brightness, jitter.contrast, jitter.saturation,
                                                          jitter.hue)

    def __repr__(self) -> str:
        return f"TrainAugmentation({self.settings})"

    def __call__(self, image: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        params = self.draw(tuple(image.shape[-2:]), generator)
        if params.size != tuple(image.shape[-2:]):
            image = F.resize_image(image, list(params.size), antialias=True)  # (3, h', w') bilinear
            label = _resize_nearest(label, params.size)
            weight = None if weight is None else _resize_nearest(weight, params.size)
        image = _crop(image, params, 0)
        label = _crop(label, params, IGNORE_INDEX)
        weight = None if weight is None else _crop(weight, params, IGNORE_INDEX)  # as tv_tensors.Mask before
        if params.flip:
            image, label = image.flip(-1), label.flip(-1)
            weight = None if weight is None else weight.flip(-1)
        for kernel, factor in params.jitter:
            image = _JITTER_KERNELS[kernel](image, factor)  # (3, h, w) uint8
        return image, label, weight

    def draw(self, size: tuple[int, int], generator: torch.Generator) -> AugmentParams:
        """All random draws of one sample for an image of ``size`` (height, width), in the former order."""
        low, high = self.settings.scale_range
        scale = low + (high - low) * torch.rand((), generator=generator).item()
        scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        rows = _span(scaled[0], self.settings.crop_size[0], generator)
        columns = _span(scaled[1], self.settings.crop_size[1], generator)
        flip = self.settings.horizontal_flip and bool(torch.rand(1, generator=generator) < 0.5)
        return AugmentParams(scaled, rows, columns, flip, self._draw_jitter(generator))

    def _draw_jitter(self, generator: torch.Generator) -> tuple[tuple[int, float], ...]:
        if self.jitter_ranges is None:
            return ()
        order = torch.randperm(4, generator=generator).tolist()
        factors = [None if bounds is None else _uniform(*bounds, generator) for bounds in self.jitter_ranges]
        return tuple((kernel, factors[kernel]) for kernel in order if factors[kernel] is not None)


def train_augmentation(settings: AugmentSettings) -> TrainAugmentation:
    """Random scale, crop (padded with ignore), flip and colour jitter, applied to image and mask together."""
    return TrainAugmentation(settings)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())  # as ColorJitter draws


def _span(length: int, crop: int, generator: torch.Generator) -> _Span:
    """The crop along one axis of ``length`` pixels, as v2.RandomCrop(pad_if_needed=True) draws it."""
    if length == crop:
        return _Span(0, 0)
    # v2.RandomCrop pads a short side by the shortfall on both sides; either way there are |length - crop| + 1 offsets
    offset = int(torch.randint(0, abs(length - crop) + 1, size=(), generator=generator))
    if length > crop:
        return _Span(-offset, crop + offset - length)  # keep [offset, offset + crop)
    return _Span(crop - length - offset, offset)  # the image lands at crop - length - offset


def _crop(tensor: torch.Tensor, params: AugmentParams, fill: float) -> torch.Tensor:
    """(..., h', w') -> (..., h, w): the window of ``params``, padded with ``fill`` where it leaves the image."""
    rows, columns = params.rows, params.columns
    if max(rows.before, rows.after, columns.before, columns.after) > 0:
        return torch.nn.functional.pad(tensor, (columns.before, columns.after, rows.before, rows.after), value=fill)
    height, width = tensor.shape[-2:]
    return tensor[..., -rows.before:height + rows.after, -columns.before:width + columns.after]  # a view


def _resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> (h, w) nearest, as F.resize does for a tv_tensors.Mask (the same interpolate call, less dispatch)."""
    return torch.nn.functional.interpolate(mask[None, None], size=list(size), mode="nearest")[0, 0]
