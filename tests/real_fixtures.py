"""Tiny on-disk GTA5, Cityscapes and SYNTHIA fixtures, in exactly the real layouts.

Each builder writes a few small images (32x16 by default) under ``root`` and
returns ``root``. The raw label ids a file holds are reproducible from
:func:`label_ids_8bit` / :func:`synthia_class_ids` (same ``index``), so a
test can compare the decoded train ids pixel by pixel with the official
tables. Every 8-bit label holds every Cityscapes labelId 0..33, every SYNTHIA
label every SYNTHIA id 0..22 (with the default size).

SYNTHIA labels are 16-bit 3- or 4-channel PNGs; Pillow and imageio cannot
write (or read) those, so :func:`write_png_16bit` encodes them directly.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABEL_TABLE
from PIL import Image

DEFAULT_SIZE = (32, 16)  # (width, height)
CITYSCAPES_MAX_ID = 33
SYNTHIA_MAX_ID = 22
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


def write_png_16bit(path: str | Path, array: np.ndarray) -> None:
    """A 16-bit PNG (1 to 4 channels, no filtering) from an (H, W[, C]) uint16 array."""
    if array.ndim == 2:
        array = array[:, :, None]
    height, width, channels = array.shape
    rows = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOR_TYPES[channels], 0, 0, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def label_ids_8bit(index: int, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Cityscapes labelIds 0..33, cycling, shifted per file: (H, W) uint8."""
    width, height = size
    values = (np.arange(width * height) + 7 * index) % (CITYSCAPES_MAX_ID + 1)
    return values.reshape(height, width).astype(np.uint8)


def synthia_class_ids(index: int, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """SYNTHIA class ids 0..22, cycling, shifted per file: (H, W) uint16."""
    width, height = size
    values = (np.arange(width * height) + 5 * index) % (SYNTHIA_MAX_ID + 1)
    return values.reshape(height, width).astype(np.uint16)


def random_image(seed: int, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_palette_label(path: Path, ids: np.ndarray) -> None:
    """An 8-bit palette PNG whose indices are labelIds, as GTA5 ships its labels."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in CITYSCAPES_LABEL_TABLE:
        if label.id >= 0:
            palette[label.id] = label.color
    image = Image.fromarray(ids)
    image.putpalette(palette.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_gray_label(path: Path, ids: np.ndarray) -> None:
    """An 8-bit grayscale PNG of labelIds, as Cityscapes ships ``*_gtFine_labelIds.png``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(path)


def gta5_name(index: int) -> str:
    return f"{index + 1:05d}"


def make_gta5(root: str | Path, count: int = 3, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """``images/00001.png`` (RGB) and ``labels/00001.png`` (palette labelIds), ..."""
    root = Path(root)
    for index in range(count):
        write_rgb(root / "images" / f"{gta5_name(index)}.png", random_image(index, size))
        write_palette_label(root / "labels" / f"{gta5_name(index)}.png", label_ids_8bit(index, size))
    return root


def cityscapes_names(cities: tuple[str, ...], per_city: int) -> list[str]:
    """``<city>_000000_0000NN`` names, in the order the builder assigns label indices."""
    return [f"{city}_{0:06d}_{19 + 10 * frame:06d}" for city in cities for frame in range(per_city)]


def make_cityscapes(
    root: str | Path,
    split: str = "train",
    cities: tuple[str, ...] = ("aachen", "bochum"),
    per_city: int = 2,
    with_labels: bool = True,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> Path:
    """``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and gtFine labelIds (+ colour)."""
    root = Path(root)
    for index, name in enumerate(cityscapes_names(cities, per_city)):
        city = name.split("_")[0]
        write_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", random_image(100 + index, size))
        if with_labels:
            labels_dir = root / "gtFine" / split / city
            write_gray_label(labels_dir / f"{name}_gtFine_labelIds.png", label_ids_8bit(index, size))
            # a sibling the listing must not pick up
            write_rgb(labels_dir / f"{name}_gtFine_color.png", random_image(200 + index, size))
    return root


def synthia_name(index: int) -> str:
    return f"{index:07d}"


def make_synthia(
    root: str | Path, count: int = 3, size: tuple[int, int] = DEFAULT_SIZE, channels: tuple[int, ...] = (3, 4)
) -> Path:
    """``RGB/0000000.png`` and 16-bit ``GT/LABELS/0000000.png``: class id in channel 0.

    Channel counts cycle through ``channels``. Channel 1 (the instance id in the
    real data) holds other valid class ids and channel 2 values above 255, so
    reading the wrong channel, or only 8 bits, gives different train ids.
    """
    root = Path(root)
    for index in range(count):
        write_rgb(root / "RGB" / f"{synthia_name(index)}.png", random_image(300 + index, size))
        class_ids = synthia_class_ids(index, size)
        planes = [class_ids, (class_ids + 7) % (SYNTHIA_MAX_ID + 1), class_ids + 1000]
        planes += [np.full_like(class_ids, 65535)]  # alpha, used by 4-channel files
        label = np.stack(planes[: channels[index % len(channels)]], axis=-1)
        write_png_16bit(root / "GT" / "LABELS" / f"{synthia_name(index)}.png", label)
    return root
