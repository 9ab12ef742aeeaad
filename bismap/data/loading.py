"""The segmentation dataset, a cache of decoded samples and a resumable batch order (manifests: bismap.data.samples).

A manifest (JSON, written by the ``index_dataset`` rule) fixes the list of
samples of one domain; training, evaluation and every later stage read it.
The training augmentation lives in :mod:`bismap.data.augment` (re-exported here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bismap.data.augment import AugmentSettings, TrainAugmentation, train_augmentation  # noqa: F401 (re-exported)
from bismap.data.formats import get_format
from bismap.data.photometric import align_image
from bismap.data.samples import (  # noqa: F401 (Manifest re-exported)
    IGNORE_INDEX,
    DatasetError,
    Manifest,
    Sample,
    check_same_size,
    open_image,
    read_train_id_label,
    resize_label_nearest,
)
from bismap.stm.weights import read_weight_map

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decoded samples are kept in memory (per dataset, per process) when all of them fit in this many bytes:
# the digit scenes (~8 KiB a sample) do, Cityscapes (~8 MiB a sample) does not.
DEFAULT_CACHE_LIMIT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Decoded:
    """One sample as read from disk, before any augmentation."""

    image: np.ndarray  # (H, W, 3) uint8, stylized by GPA when the dataset does so
    label: np.ndarray  # (H, W) uint8 train ids, 255 = ignore
    weight: np.ndarray | None  # (H, W) float32 in [0, 1]

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.label.nbytes + (0 if self.weight is None else self.weight.nbytes)


class DecodedCache:
    """Decoded samples of one dataset in this process, kept only if the whole dataset fits in ``limit_bytes``.

    The first sample added decides: its size times ``count`` must fit, else
    nothing is ever kept (a Cityscapes-scale dataset is never cached). Samples
    whose sizes vary stop being added once ``limit_bytes`` are held. Each
    DataLoader worker fills its own copy: a forked worker starts from what the
    parent held, a pickled (spawned) one starts empty.
    """

    def __init__(self, limit_bytes: int, count: int) -> None:
        self.limit_bytes, self.count = limit_bytes, count
        self.enabled: bool | None = None if limit_bytes > 0 else False  # None: undecided until the first sample
        self.entries: dict[int, Decoded] = {}
        self.bytes = 0

    def get(self, index: int) -> Decoded | None:
        return self.entries.get(index)

    def add(self, index: int, decoded: Decoded) -> None:
        if self.enabled is None:
            self.enabled = decoded.nbytes * self.count <= self.limit_bytes
            logger.debug("decoded-sample cache %s: ~%d bytes for %d samples, limit %d",
                         "on" if self.enabled else "off", decoded.nbytes * self.count, self.count, self.limit_bytes)
        if self.enabled and self.bytes + decoded.nbytes <= self.limit_bytes:
            self.entries[index] = decoded
            self.bytes += decoded.nbytes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "entries": {}, "bytes": 0}


class SegmentationDataset(Dataset):
    """Items are dicts: ``image`` (3, H, W) float, normalised; ``label`` (H, W) int64; ``index``.

    An item may be requested as ``(index, seed)``: the augmentation then draws
    from a generator seeded with ``seed``, so a batch is the same whichever
    worker builds it and whether or not training was resumed. A plain index
    draws from a copy of the global CPU generator, which it leaves untouched.

    With ``photometric_statistics`` (target statistics of
    :mod:`bismap.data.photometric`) every image is stylized to the target by
    Global Photometric Alignment (BiSMAP Sec. 3.5) right after reading, on the
    whole uint8 image and before any augmentation.

    ``label_paths`` (sample name -> PNG of train ids) replaces the manifest's
    labels, e.g. by pseudo-labels. ``weight_paths`` (sample name -> 16-bit
    PNG) adds a per-pixel ``weight`` (H, W) float32, e.g. the source
    transferability map (BiSMAP Eq. 9), moved by the same augmentation as the
    image and set to 0 where the label is 255.

    Decoded samples (after GPA) are kept in memory when the whole dataset fits
    in ``cache_limit_bytes`` (see :class:`DecodedCache`; 0 turns it off); the
    items are the same either way.
    """

    def __init__(self, manifest: Manifest, augmentation: TrainAugmentation | None = None, labelled: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 photometric_statistics: dict[str, Any] | None = None,
                 label_paths: Mapping[str, str | Path] | None = None,
                 weight_paths: Mapping[str, str | Path] | None = None,
                 cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES) -> None:
        self.manifest = manifest
        self.label_paths, self.weight_paths = label_paths, weight_paths
        for name, paths in (("label", label_paths), ("weight", weight_paths)):
            missing = [sample.name for sample in manifest.samples if paths is not None and sample.name not in paths]
            if missing:
                raise DatasetError(f"no {name} map for {len(missing)} image(s), e.g. {missing[:3]}")
        self.photometric_statistics = photometric_statistics
        self.augmentation = augmentation
        self.labelled = labelled
        if not all(std):
            raise ValueError(f"std must be non-zero, got {std}")
        self.mean, self.std = list(mean), list(std)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # (3, 1, 1)
        self.read_label = get_format(manifest.format).read_label
        if labelled and any(sample.label is None for sample in manifest.samples):
            missing = next(sample for sample in manifest.samples if sample.label is None)
            raise DatasetError(f"labels required but image {missing.image} has no label file")
        self.cache = DecodedCache(cache_limit_bytes, len(manifest.samples))

    def __len__(self) -> int:
        return len(self.manifest.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        decoded = self.decoded(index)
        image = torch.from_numpy(decoded.image).permute(2, 0, 1)  # (3, H, W) uint8, a view
        label = torch.from_numpy(decoded.label)  # (H, W) uint8, a view
        weight = None if decoded.weight is None else torch.from_numpy(decoded.weight)  # (H, W) float32
        if self.augmentation is not None:
            image, label, weight = self.augmentation(image, label, weight, _generator(seed))
        # new tensors from here on: nothing returned shares memory with the decoded arrays (nor the cache)
        # F.normalize(F.to_dtype(image, float32, scale=True), mean, std), op for op, with the tensors made once
        pixels = image.to(torch.float32).mul_(1.0 / 255).sub_(self._mean).div_(self._std)  # (3, H, W)
        label = label.long()
        item = {"image": pixels, "label": label, "index": index}
        if weight is not None:
            item["weight"] = torch.where(label == IGNORE_INDEX, 0.0, weight)
        return item

    def decoded(self, index: int) -> Decoded:
        """Sample ``index`` as read (and stylized), from the cache when it holds it."""
        decoded = self.cache.get(index)
        if decoded is None:
            decoded = self._read(self.manifest.samples[index])
            self.cache.add(index, decoded)
        return decoded

    def _read(self, sample: Sample) -> Decoded:
        image = open_image(sample.image)  # (H, W, 3) uint8
        if self.photometric_statistics is not None:
            image = align_image(image, self.photometric_statistics)  # GPA, Sec. 3.5
        label = self._label(sample, image.shape)
        weight = None if self.weight_paths is None else self._weight(sample, image.shape)
        return Decoded(image, label, weight)

    def _label(self, sample: Sample, image_shape: tuple[int, ...]) -> np.ndarray:
        if self.label_paths is not None:
            label = read_train_id_label(self.label_paths[sample.name], self.manifest.num_classes)
        elif not self.labelled or sample.label is None:
            return np.full(image_shape[:2], IGNORE_INDEX, dtype=np.uint8)
        else:
            label = self.read_label(Path(sample.label), self.manifest.num_classes)  # (h, w) uint8
            if sample.resize_label:  # indexed under label_size_mismatch: resize_label
                label = resize_label_nearest(label, image_shape)  # (H, W)
        check_same_size(image_shape, label.shape, sample)
        return label

    def _weight(self, sample: Sample, image_shape: tuple[int, ...]) -> np.ndarray:
        weights = read_weight_map(self.weight_paths[sample.name])  # (H, W) float32 in [0, 1]
        check_same_size(image_shape, weights.shape, sample)
        return weights


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``; with None, a copy of the global one (which is not advanced)."""
    generator = torch.Generator()
    if seed is None:
        generator.set_state(torch.random.get_rng_state())  # what the former fork_rng() drew from
    else:
        generator.manual_seed(seed)  # the same stream as the former default_generator.manual_seed(seed)
    return generator


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
