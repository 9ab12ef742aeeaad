"""The dataset formats a config may name, and how each is listed and decoded.

A format is a pair of plain functions, kept in one dict: adding a dataset means
writing those two functions and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bismap.data.real_datasets import (
    list_cityscapes_samples,
    list_gta5_samples,
    list_synthia_samples,
    read_label_ids,
    read_synthia_label,
)
from bismap.data.samples import DatasetError, Sample, paired_folder_samples, read_train_id_label


@dataclass(frozen=True)
class DatasetFormat:
    # (root, split) -> samples in a fixed, sorted order
    list_samples: Callable[[Path, str], list[Sample]]
    # (label path, num_classes) -> train ids (H, W) uint8, 255 = ignore
    read_label: Callable[[Path, int], np.ndarray]


FORMATS: dict[str, DatasetFormat] = {
    "digit_scenes": DatasetFormat(paired_folder_samples, read_train_id_label),
    "gta5": DatasetFormat(list_gta5_samples, read_label_ids),
    "cityscapes": DatasetFormat(list_cityscapes_samples, read_label_ids),
    "synthia": DatasetFormat(list_synthia_samples, read_synthia_label),
}


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise DatasetError(f"unknown dataset format '{name}'; known: {sorted(FORMATS)}")
    return FORMATS[name]
