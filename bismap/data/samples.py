"""Image/label pairs, label decoding and the checks every loader shares.

A *format* knows how to list the (image, label) pairs under a dataset root and
how to turn a label file into train ids (uint8, 255 = ignore). Everything
downstream reads a dataset through the manifest the ``index_dataset`` rule
writes, never by listing folders again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bismap.io import read_json

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One image and its label file (``None`` for an unlabelled target image)."""

    name: str
    image: str
    label: str | None
    resize_label: bool = False  # the label has another size than the image: nearest-neighbour to it when read


@dataclass(frozen=True)
class Manifest:
    """The samples of one domain as the ``index_dataset`` rule wrote them (a JSON file).

    It lives here, next to :class:`Sample`, rather than in
    :mod:`bismap.data.loading`, so that modules below the loader (e.g.
    :mod:`bismap.data.photometric`, which the loader imports) can read a
    manifest without an import cycle.
    """

    format: str
    num_classes: int
    samples: tuple[Sample, ...]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Manifest:
        """The manifest at ``path``; with ``verify``, every file must still have the size and modification time
        it was indexed with (manifests of earlier releases carry none and are not checked)."""
        data = read_json(path)
        samples = tuple(Sample(item["name"], item["image"], item["label"], bool(item.get("resize_label", False)))
                        for item in data["samples"])
        if verify:
            for item in data["samples"]:
                for kind in ("image", "label"):
                    _check_unchanged(item[kind], item.get(f"{kind}_stat"), path)
        return cls(data["format"], int(data["num_classes"]), samples)


def file_stat(path: str | Path) -> list[int]:
    """[size in bytes, modification time in ns]: what the index records of each file."""
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]


def _check_unchanged(path: str | None, recorded: list[int] | None, manifest_path: str | Path) -> None:
    if path is None or recorded is None:
        return
    try:
        current = file_stat(path)
    except FileNotFoundError as error:
        raise DatasetError(f"{path} was indexed in {manifest_path} but is missing now; rerun its index "
                           "(snakemake --forcerun index_dataset)") from error
    if current != list(recorded):
        raise DatasetError(f"{path} changed after it was indexed in {manifest_path} (size, modification time "
                           f"{recorded} -> {current}); rerun its index (snakemake --forcerun index_dataset)")


def open_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as uint8 (H, W, 3); a bad file raises DatasetError naming it."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError as error:
        raise DatasetError(f"missing image file: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"unreadable image file: {path} ({error})") from error


def open_label_array(path: str | Path) -> np.ndarray:
    """Read a label PNG as stored (uint8 or uint16, 2-D or 3-D) without conversion."""
    try:
        with Image.open(path) as image:
            return np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    except FileNotFoundError as error:
        raise DatasetError(f"missing label file: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"unreadable label file: {path} ({error})") from error


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only; a bad file raises DatasetError."""
    try:
        with Image.open(path) as image:
            image.verify()
            return image.size
    except FileNotFoundError as error:
        raise DatasetError(f"missing file: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"unreadable file: {path} ({error})") from error


def check_train_ids(label: np.ndarray, num_classes: int, path: str | Path) -> np.ndarray:
    """Train ids must be < num_classes or IGNORE_INDEX; otherwise name the file and values."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DatasetError(
            f"label values {bad.tolist()} outside the class set (0..{num_classes - 1}, "
            f"{IGNORE_INDEX}=ignore) in {path}"
        )
    return label


LABEL_SIZE_POLICIES = ("error", "resize_label")


def resize_label_nearest(label: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """(h, w) train ids -> (H, W) of the image, nearest neighbour: no id is invented between two classes."""
    height, width = image_shape[:2]
    return np.array(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))


def check_same_size(image_shape: tuple[int, ...], label_shape: tuple[int, ...], sample: Sample) -> None:
    if tuple(image_shape[:2]) != tuple(label_shape[:2]):
        raise DatasetError(
            f"label {sample.label} is {label_shape[1]}x{label_shape[0]} but image "
            f"{sample.image} is {image_shape[1]}x{image_shape[0]} (width x height)"
        )


def paired_folder_samples(root: str | Path, split: str = "") -> list[Sample]:
    """``<root>/images/*.png`` with ``<root>/labels/<same name>.png`` when present."""
    folder = Path(root)
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"no images folder at {images_dir}")
    samples = []
    for image in sorted(images_dir.glob("*.png")):
        label = folder / "labels" / image.name
        samples.append(Sample(image.stem, str(image), str(label) if label.exists() else None))
    if not samples:
        raise DatasetError(f"no *.png images under {images_dir}")
    return samples


def read_train_id_label(path: str | Path, num_classes: int) -> np.ndarray:
    """Labels stored directly as train ids (the embedded benchmark): (H, W) uint8."""
    label = open_label_array(path)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(f"expected a single-channel 8-bit label PNG: {path} has {label.dtype} {label.shape}")
    return check_train_ids(label, num_classes, path)
