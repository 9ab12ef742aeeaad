"""The segmentation dataset, augmentation and a resumable batch order (manifests: bismap.data.samples).

A manifest (JSON, written by the ``index_dataset`` rule) fixes the list of
samples of one domain; training, evaluation and every later stage read it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bismap.data.formats import get_format
from bismap.data.photometric import align_image
from bismap.data.samples import (
    IGNORE_INDEX,
    DatasetError,
    Manifest,
    Sample,
    check_same_size,
    open_image,
    read_train_id_label,
)
from bismap.stm.weights import read_weight_map

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentSettings:
    crop_size: tuple[int, int] = (512, 896)  # (height, width)
    scale_range: tuple[float, float] = (0.5, 1.5)
    horizontal_flip: bool = True
    # brightness, contrast, saturation, hue, as torchvision's ColorJitter
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)


def train_augmentation(settings: AugmentSettings) -> v2.Transform:
    """Random scale, crop (padded with ignore), flip and colour jitter, applied to image and mask together."""
    height, width = settings.crop_size
    steps: list[v2.Transform] = [
        RandomScale(settings.scale_range),
        v2.RandomCrop((height, width), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if settings.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if any(settings.color_jitter):
        brightness, contrast, saturation, hue = settings.color_jitter
        steps.append(v2.ColorJitter(brightness, contrast, saturation, hue))  # touches the image only
    return v2.Compose(steps)


class RandomScale(torch.nn.Module):
    """Resize image (bilinear) and mask (nearest) by one factor drawn from ``scale_range``."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale_range = scale_range

    def forward(self, image: tv_tensors.Image, *masks: tv_tensors.Mask) -> tuple[torch.Tensor, ...]:
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
        # masks (labels, transferability weights) resize with nearest
        return F.resize(image, size, antialias=True), *(F.resize(mask, size) for mask in masks)


class SegmentationDataset(Dataset):
    """Items are dicts: ``image`` (3, H, W) float, normalised; ``label`` (H, W) int64; ``index``.

    An item may be requested as ``(index, seed)``: the augmentation then draws
    from a generator seeded with ``seed``, so a batch is the same whichever
    worker builds it and whether or not training was resumed.

    With ``photometric_statistics`` (target statistics of
    :mod:`bismap.data.photometric`) every image is stylized to the target by
    Global Photometric Alignment (BiSMAP Sec. 3.5) right after reading, on the
    whole uint8 image and before any augmentation.

    ``label_paths`` (sample name -> PNG of train ids) replaces the manifest's
    labels, e.g. by pseudo-labels. ``weight_paths`` (sample name -> 16-bit
    PNG) adds a per-pixel ``weight`` (H, W) float32, e.g. the source
    transferability map (BiSMAP Eq. 9), moved by the same augmentation as the
    image and set to 0 where the label is 255.
    """

    def __init__(self, manifest: Manifest, augmentation: v2.Transform | None = None, labelled: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 photometric_statistics: dict[str, Any] | None = None,
                 label_paths: Mapping[str, str | Path] | None = None,
                 weight_paths: Mapping[str, str | Path] | None = None) -> None:
        self.manifest = manifest
        self.label_paths, self.weight_paths = label_paths, weight_paths
        for name, paths in (("label", label_paths), ("weight", weight_paths)):
            missing = [sample.name for sample in manifest.samples if paths is not None and sample.name not in paths]
            if missing:
                raise DatasetError(f"no {name} map for {len(missing)} image(s), e.g. {missing[:3]}")
        self.photometric_statistics = photometric_statistics
        self.augmentation = augmentation
        self.labelled = labelled
        self.mean, self.std = list(mean), list(std)
        self.read_label = get_format(manifest.format).read_label
        if labelled and any(sample.label is None for sample in manifest.samples):
            missing = next(sample for sample in manifest.samples if sample.label is None)
            raise DatasetError(f"labels required but image {missing.image} has no label file")

    def __len__(self) -> int:
        return len(self.manifest.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.manifest.samples[index]
        image_array = open_image(sample.image)  # (H, W, 3) uint8
        if self.photometric_statistics is not None:
            image_array = align_image(image_array, self.photometric_statistics)  # GPA, Sec. 3.5
        image = tv_tensors.Image(torch.from_numpy(image_array).permute(2, 0, 1))
        label_array = self._label(sample, image_array.shape)
        masks = [tv_tensors.Mask(torch.from_numpy(label_array))]
        if self.weight_paths is not None:
            masks.append(tv_tensors.Mask(torch.from_numpy(self._weight(sample, image_array.shape))))
        if self.augmentation is not None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    # The CPU generator only: torch.manual_seed would also seed (and on a
                    # CPU-only run, queue a lazy call with a stack trace for) every CUDA
                    # device, outside what fork_rng(devices=[]) restores, at ~0.8 ms a sample.
                    torch.random.default_generator.manual_seed(seed)
                image, *masks = self.augmentation(image, *masks)
        pixels = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        label = masks[0].as_subclass(torch.Tensor).long()
        item = {"image": pixels.as_subclass(torch.Tensor), "label": label, "index": index}
        if self.weight_paths is not None:
            item["weight"] = torch.where(label == IGNORE_INDEX, 0.0, masks[1].as_subclass(torch.Tensor))
        return item

    def _label(self, sample: Sample, image_shape: tuple[int, ...]) -> np.ndarray:
        if self.label_paths is not None:
            label = read_train_id_label(self.label_paths[sample.name], self.manifest.num_classes)
        elif not self.labelled or sample.label is None:
            return np.full(image_shape[:2], IGNORE_INDEX, dtype=np.uint8)
        else:
            label = self.read_label(Path(sample.label), self.manifest.num_classes)  # (H, W) uint8
        check_same_size(image_shape, label.shape, sample)
        return label

    def _weight(self, sample: Sample, image_shape: tuple[int, ...]) -> np.ndarray:
        weights = read_weight_map(self.weight_paths[sample.name])  # (H, W) float32 in [0, 1]
        check_same_size(image_shape, weights.shape, sample)
        return weights


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, augmentation seed), fixed by (seed, iteration) alone.

    Epoch ``e`` visits a permutation drawn from ``seed + e``; iteration ``i``
    takes positions ``[i*B, (i+1)*B)`` of the concatenated epochs, so starting at
    ``start_iteration`` continues exactly where an interrupted run stopped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, iterations: int, start_iteration: int = 0) -> None:
        if num_samples < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.iterations, self.start_iteration = iterations, start_iteration
        self._cached_epoch, self._cached_order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return max(0, self.iterations - self.start_iteration)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start_iteration, self.iterations):
            first = iteration * self.batch_size
            yield [self._item(position) for position in range(first, first + self.batch_size)]

    def _item(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.num_samples)
        order = self._permutation(epoch)
        return int(order[offset]), (self.seed * 1_000_003 + position) % (2**31)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._cached_epoch = epoch
        return self._cached_order
