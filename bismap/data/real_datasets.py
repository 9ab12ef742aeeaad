"""GTA5, Cityscapes and SYNTHIA (RAND-CITYSCAPES): how their files are listed and decoded.

Every label comes back in the 19-class Cityscapes train-id space (uint8, 255 =
ignore), the space BiSMAP evaluates in (BiSMAP Sec. 4.1, Tables 1 and 2):

* GTA5 and Cityscapes store Cityscapes ``labelIds`` in 8-bit PNGs (GTA5 as a
  palette image whose indices are the ids). The id -> train-id table is built
  from the official label table in ``cityscapesscripts.helpers.labels``; ids
  whose ``trainId`` is 255 or -1 map to ignore, and an id the table does not
  know (e.g. 200) raises :class:`DatasetError` naming the file and the values.
* SYNTHIA RAND-CITYSCAPES stores its own class ids (0..22) in the FIRST channel
  of 16-bit, 3- or 4-channel PNGs. Pillow, imageio (pillow plugin) and
  scikit-image silently reduce such files to 8 bits (keeping the high byte,
  so every id < 256 reads as 0); we decode them with
  ``torchvision.io.decode_png`` (``ImageReadMode.UNCHANGED`` keeps uint16).
  The ids map through the 16-class correspondence used by the public UDA code
  (ProDA, DAFormer); every other id (void, parking-slot, road-work, terrain,
  truck, train, lanemarking) is ignore. The 16- and 13-class evaluation
  subsets are a metric concern: :data:`SYNTHIA_16_CLASSES`,
  :data:`SYNTHIA_13_CLASSES`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABEL_TABLE

from bismap.data.samples import IGNORE_INDEX, DatasetError, Sample, check_train_ids, open_label_array

logger = logging.getLogger(__name__)

CITYSCAPES_NUM_CLASSES = 19

# SYNTHIA class id -> Cityscapes train id (SYNTHIA README ids; the mapping of
# the public ProDA / DAFormer code). Ids absent here (0 void, 13 parking-slot,
# 14 road-work, 16 terrain, 18 truck, 20 train, 22 lanemarking) are ignored.
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = {
    3: 0,  # road
    4: 1,  # sidewalk
    2: 2,  # building
    21: 3,  # wall
    5: 4,  # fence
    7: 5,  # pole
    15: 6,  # traffic light
    9: 7,  # traffic sign
    6: 8,  # vegetation
    1: 10,  # sky
    10: 11,  # pedestrian -> person
    17: 12,  # rider
    8: 13,  # car
    19: 15,  # bus
    12: 17,  # motorcycle
    11: 18,  # bicycle
}
SYNTHIA_MAX_ID = 22  # 22 = lanemarking, the last id SYNTHIA documents

# SYNTHIA -> Cityscapes is evaluated on 16 classes (no terrain 9, truck 14,
# train 16) and on 13 (also without wall 3, fence 4, pole 5): BiSMAP Table 2.
SYNTHIA_16_CLASSES: tuple[int, ...] = tuple(sorted(SYNTHIA_ID_TO_TRAIN_ID.values()))
SYNTHIA_13_CLASSES: tuple[int, ...] = tuple(c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5))

NO_SPLIT = ("", "all")


@dataclass(frozen=True)
class LabelLookup:
    """Raw dataset id -> train id, plus which raw ids the source table documents."""

    name: str
    table: np.ndarray  # uint8 (max_id + 1,): train id, 255 = ignore
    known: np.ndarray  # bool (max_id + 1,): the id is in the documented table

    def apply(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map an integer array of raw ids; unknown ids raise DatasetError naming the file."""
        too_large = raw >= self.table.size
        if too_large.any():
            self._raise_unknown(np.unique(raw[too_large]), path)
        unknown = ~self.known[raw]
        if unknown.any():
            self._raise_unknown(np.unique(raw[unknown]), path)
        return self.table[raw]

    def _raise_unknown(self, values: np.ndarray, path: str | Path) -> None:
        raise DatasetError(
            f"label ids {values.tolist()[:20]} are not in the {self.name} label table in {path}"
        )


def build_lookup(id_to_train_id: Mapping[int, int], name: str) -> LabelLookup:
    """A lookup table from {raw id: train id}; train ids 255 or -1 become ignore."""
    size = max(id_to_train_id) + 1
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(size, dtype=bool)
    for raw_id, train_id in id_to_train_id.items():
        if raw_id < 0:
            raise ValueError(f"{name}: negative raw id {raw_id}")
        known[raw_id] = True
        table[raw_id] = IGNORE_INDEX if train_id in (255, -1) else train_id
    table.flags.writeable = False
    known.flags.writeable = False
    return LabelLookup(name, table, known)


def cityscapes_id_to_train_id() -> dict[int, int]:
    """{labelId: trainId} from the official table; ids < 0 (license plate) are never stored."""
    return {label.id: label.trainId for label in CITYSCAPES_LABEL_TABLE if label.id >= 0}


def cityscapes_class_names() -> tuple[str, ...]:
    """The 19 class names in train-id order, from the official table."""
    by_train_id = {label.trainId: label.name for label in CITYSCAPES_LABEL_TABLE}
    return tuple(by_train_id[train_id] for train_id in range(CITYSCAPES_NUM_CLASSES))


CITYSCAPES_CLASS_NAMES: tuple[str, ...] = cityscapes_class_names()


@functools.cache
def cityscapes_lookup() -> LabelLookup:
    return build_lookup(cityscapes_id_to_train_id(), "Cityscapes labelIds")


@functools.cache
def synthia_lookup() -> LabelLookup:
    documented = {raw_id: IGNORE_INDEX for raw_id in range(SYNTHIA_MAX_ID + 1)}
    return build_lookup({**documented, **SYNTHIA_ID_TO_TRAIN_ID}, "SYNTHIA")


# ---------------------------------------------------------------- listing


def _check_no_split(dataset: str, split: str) -> None:
    if split not in NO_SPLIT:
        raise DatasetError(f"{dataset} has no splits; use split '' or 'all', got '{split}'")


def _paired_by_file_name(images_dir: Path, labels_dir: Path, dataset: str) -> list[Sample]:
    """Every ``images_dir/*.png`` with the label of the same file name, which must exist."""
    if not images_dir.is_dir():
        raise DatasetError(f"{dataset}: no image folder at {images_dir}")
    images = sorted(images_dir.glob("*.png"))
    if not images:
        raise DatasetError(f"{dataset}: no *.png images under {images_dir}")
    samples = [Sample(image.stem, str(image), str(labels_dir / image.name)) for image in images]
    missing = [sample.label for sample in samples if not Path(sample.label).is_file()]
    if missing:
        raise DatasetError(f"{dataset}: {len(missing)} image(s) without a label file, e.g. {missing[:3]}")
    return samples


def list_gta5_samples(root: Path, split: str) -> list[Sample]:
    """``<root>/images/*.png`` with ``<root>/labels/<same name>``; no splits."""
    _check_no_split("GTA5", split)
    return _paired_by_file_name(Path(root) / "images", Path(root) / "labels", "GTA5")


def list_synthia_samples(root: Path, split: str) -> list[Sample]:
    """``<root>/RGB/*.png`` with ``<root>/GT/LABELS/<same name>``; no splits."""
    _check_no_split("SYNTHIA", split)
    return _paired_by_file_name(Path(root) / "RGB", Path(root) / "GT" / "LABELS", "SYNTHIA")


def list_cityscapes_samples(root: Path, split: str) -> list[Sample]:
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png``; label ``None`` where gtFine lacks it."""
    images_dir = Path(root) / "leftImg8bit" / split
    if not split or not images_dir.is_dir():
        raise DatasetError(f"Cityscapes: no image folder for split '{split}' at {images_dir}")
    samples = []
    for image in sorted(images_dir.glob("*/*_leftImg8bit.png")):
        name = image.name.removesuffix("_leftImg8bit.png")
        label = Path(root) / "gtFine" / split / image.parent.name / f"{name}_gtFine_labelIds.png"
        samples.append(Sample(name, str(image), str(label) if label.is_file() else None))
    if not samples:
        raise DatasetError(f"Cityscapes: no <city>/*_leftImg8bit.png under {images_dir}")
    labelled = sum(sample.label is not None for sample in samples)
    if 0 < labelled < len(samples):
        logger.warning("Cityscapes %s: only %d of %d images have gtFine labelIds", split, labelled, len(samples))
    return sorted(samples, key=lambda sample: sample.name)


# ---------------------------------------------------------------- labels


def _check_num_classes(num_classes: int, path: str | Path) -> None:
    if num_classes != CITYSCAPES_NUM_CLASSES:
        raise DatasetError(
            f"labels are in the {CITYSCAPES_NUM_CLASSES}-class Cityscapes train-id space, "
            f"but num_classes={num_classes} was asked for {path}"
        )


def read_label_ids(path: Path, num_classes: int) -> np.ndarray:
    """GTA5 / Cityscapes 8-bit labelIds PNG -> train ids (H, W) uint8, 255 = ignore."""
    _check_num_classes(num_classes, path)
    raw = open_label_array(path)
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise DatasetError(
            f"expected a single-channel 8-bit labelIds PNG: {path} has {raw.dtype} {raw.shape}"
        )
    return check_train_ids(cityscapes_lookup().apply(raw, path), num_classes, path)


def open_png_16bit(path: str | Path) -> np.ndarray:
    """A PNG as stored, (H, W, C) uint8 or uint16, via torchvision (Pillow drops to 8 bits).

    torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec
    (not a dependency here); the pinned version decodes 16-bit PNGs exactly,
    so that DeprecationWarning is silenced for this call only.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_png  # heavy import, only here

    if not Path(path).is_file():
        raise DatasetError(f"missing label file: {path}")
    encoded = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            warnings.filterwarnings("ignore", message=".*TorchCodec.*")
            tensor = decode_png(encoded, mode=ImageReadMode.UNCHANGED)
    except RuntimeError as error:
        raise DatasetError(f"unreadable label file: {path} ({error})") from error
    return tensor.permute(1, 2, 0).numpy()


def read_synthia_label(path: Path, num_classes: int) -> np.ndarray:
    """SYNTHIA 16-bit label PNG, class id in channel 0 -> train ids (H, W) uint8."""
    _check_num_classes(num_classes, path)
    raw = open_png_16bit(path)
    if raw.dtype != np.uint16 or raw.shape[2] not in (3, 4):
        raise DatasetError(
            f"expected a 16-bit 3- or 4-channel SYNTHIA label PNG: {path} has "
            f"{raw.dtype} with {raw.shape[2]} channel(s)"
        )
    class_ids = np.ascontiguousarray(raw[:, :, 0])
    return check_train_ids(synthia_lookup().apply(class_ids, path), num_classes, path)
