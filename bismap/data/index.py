"""Index a dataset once: list its pairs, check every file, count pixels per class.

The manifest it writes is the only way later stages see a dataset, so a bad
file is found here, named, before any training starts. It records each file's
size and modification time, and every stage that loads the manifest checks them
(:meth:`bismap.data.samples.Manifest.load`): a file changed after indexing fails
at once, named, instead of inside a training job that reaches it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from bismap.progress import tqdm

from bismap.data.formats import get_format
from bismap.data.samples import (LABEL_SIZE_POLICIES, DatasetError, Sample, check_same_size, file_stat,
                                 image_size, resize_label_nearest)
from bismap.io import write_json

logger = logging.getLogger(__name__)


def index_dataset(format_name: str, root: str | Path, split: str, num_classes: int,
                  require_labels: bool, output_path: str | Path, label_size_mismatch: str = "error") -> dict:
    """Write the manifest JSON for one domain; raise DatasetError naming the first bad file.

    ``label_size_mismatch``: a pair whose label has another size than its image fails (``error``), or its label
    is resized to the image by nearest neighbour whenever it is read (``resize_label``; the real GTA5 release
    has such pairs: ProDA's loader resizes every image and label to 1914x1052). The manifest counts and lists
    the resized pairs.
    """
    if label_size_mismatch not in LABEL_SIZE_POLICIES:
        raise DatasetError(f"label_size_mismatch must be one of {LABEL_SIZE_POLICIES}, got '{label_size_mismatch}'")
    dataset_format = get_format(format_name)
    samples = list(dataset_format.list_samples(Path(root), split))
    if require_labels:
        unlabelled = [sample.image for sample in samples if sample.label is None]
        if unlabelled:
            raise DatasetError(f"{len(unlabelled)} image(s) without a label file, first: {unlabelled[0]}")
    pixels_per_class = np.zeros(num_classes + 1, dtype=np.int64)  # last slot: ignore
    for position, sample in enumerate(tqdm(samples, desc=f"index {Path(root).name}", unit="img")):
        counts, mismatched = _check_sample(sample, dataset_format.read_label, num_classes, label_size_mismatch)
        pixels_per_class += counts
        if mismatched:
            samples[position] = dataclasses.replace(sample, resize_label=True)
    resized = [sample.name for sample in samples if sample.resize_label]
    if resized:
        logger.warning("%d label(s) differ in size from their image and are resized to it (nearest), first: %s",
                       len(resized), resized[:5])
    manifest = {
        "format": format_name,
        "root": str(root),
        "split": split,
        "num_classes": num_classes,
        "count": len(samples),
        "labelled": sum(sample.label is not None for sample in samples),
        "pixels_per_class": pixels_per_class[:num_classes].tolist(),
        "ignored_pixels": int(pixels_per_class[num_classes]),
        "label_size_mismatch": label_size_mismatch,
        "labels_resized": len(resized),
        "samples": [{"name": s.name, "image": s.image, "label": s.label, "resize_label": s.resize_label,
                     "image_stat": file_stat(s.image), "label_stat": file_stat(s.label) if s.label else None}
                    for s in samples],
    }
    write_json(output_path, manifest)
    logger.info("indexed %d images (%d labelled) under %s", len(samples), manifest["labelled"], root)
    return manifest


def _check_sample(sample: Sample, read_label, num_classes: int, policy: str) -> tuple[np.ndarray, bool]:
    """Pixels per class (ignore last) of the label as training reads it, and whether its size differs."""
    width, height = image_size(sample.image)
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    if sample.label is None:
        return counts, False
    label = read_label(Path(sample.label), num_classes)  # (h, w) uint8 train ids, checked
    mismatched = tuple(label.shape[:2]) != (height, width)
    if mismatched and policy == "resize_label":
        label = resize_label_nearest(label, (height, width))  # (H, W)
    check_same_size((height, width), label.shape, sample)
    values = np.minimum(label.ravel(), num_classes)  # 255 (ignore) lands in the last slot
    return np.bincount(values, minlength=num_classes + 1), mismatched
