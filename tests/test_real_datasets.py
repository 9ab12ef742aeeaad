"""Tests for the GTA5, Cityscapes and SYNTHIA formats (bismap.data.real_datasets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from bismap.data.formats import FORMATS, get_format
from bismap.data.real_datasets import (
    CITYSCAPES_CLASS_NAMES,
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
    build_lookup,
    cityscapes_lookup,
    read_label_ids,
    read_synthia_label,
)
from bismap.data.samples import DatasetError, check_same_size, image_size, paired_folder_samples
from tests.real_fixtures import (
    label_ids_8bit,
    make_cityscapes,
    make_gta5,
    make_synthia,
    synthia_class_ids,
    write_gray_label,
    write_palette_label,
    write_png_16bit,
)

NUM_CLASSES = 19

# SYNTHIA id -> Cityscapes train id, typed here independently of the module:
# SYNTHIA README ids, mapping of the public ProDA / DAFormer code.
DOCUMENTED_SYNTHIA = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7,
    6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip


def official_train_id(raw_id: int) -> int:
    train_id = id2label[raw_id].trainId
    return 255 if train_id in (255, -1) else train_id


def expected_cityscapes(raw: np.ndarray) -> np.ndarray:
    return np.vectorize(official_train_id, otypes=[np.uint8])(raw)


def expected_synthia(raw: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda value: DOCUMENTED_SYNTHIA.get(int(value), 255), otypes=[np.uint8])(raw)


# ---------------------------------------------------------------- tables


def test_cityscapes_lookup_matches_official_table_for_every_id() -> None:
    lookup = cityscapes_lookup()
    assert lookup.table.size == 34 and lookup.known.all()
    for raw_id in range(34):
        assert lookup.table[raw_id] == official_train_id(raw_id), raw_id
    # spot checks of the well-known values
    assert [int(lookup.table[raw_id]) for raw_id in (7, 8, 11, 21, 23, 26, 33)] == [0, 1, 2, 8, 10, 13, 18]
    ignored = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
    assert all(lookup.table[raw_id] == 255 for raw_id in ignored)
    assert sorted(set(lookup.table.tolist()) - {255}) == list(range(19))


def test_class_names_and_synthia_subsets() -> None:
    assert len(CITYSCAPES_CLASS_NAMES) == 19
    assert CITYSCAPES_CLASS_NAMES[0] == "road" and CITYSCAPES_CLASS_NAMES[18] == "bicycle"
    assert CITYSCAPES_CLASS_NAMES[9] == "terrain" and CITYSCAPES_CLASS_NAMES[13] == "car"
    assert SYNTHIA_16_CLASSES == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert SYNTHIA_13_CLASSES == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    # BiSMAP Table 2 columns (13 classes)
    names = [CITYSCAPES_CLASS_NAMES[index] for index in SYNTHIA_13_CLASSES]
    assert names == ["road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
                     "person", "rider", "car", "bus", "motorcycle", "bicycle"]


def test_build_lookup_ignores_255_and_minus_one() -> None:
    lookup = build_lookup({0: -1, 1: 255, 2: 4}, "toy")
    assert lookup.table.tolist() == [255, 255, 4] and lookup.known.tolist() == [True, True, True]
    with pytest.raises(DatasetError, match=r"\[3, 9\].*toy.*x\.png"):
        lookup.apply(np.array([[0, 3], [9, 2]], dtype=np.uint8), "x.png")


def test_formats_registered() -> None:
    assert set(FORMATS) >= {"digit_scenes", "gta5", "cityscapes", "synthia"}
    assert FORMATS["digit_scenes"].list_samples is paired_folder_samples
    assert get_format("synthia").read_label is read_synthia_label
    assert get_format("gta5").read_label is read_label_ids


# ---------------------------------------------------------------- labels, pixel by pixel


def test_gta5_labels_pixel_by_pixel(tmp_path: Path) -> None:
    fmt = get_format("gta5")
    samples = fmt.list_samples(make_gta5(tmp_path, count=3), "")
    for index, sample in enumerate(samples):
        raw = label_ids_8bit(index)
        assert set(np.unique(raw).tolist()) == set(range(34))
        with Image.open(sample.label) as stored:
            assert stored.mode == "P" and np.array_equal(np.asarray(stored), raw)
        label = fmt.read_label(Path(sample.label), NUM_CLASSES)
        assert label.dtype == np.uint8 and label.shape == (16, 32)
        assert np.array_equal(label, expected_cityscapes(raw))
    assert (label == 255).sum() == np.isin(raw, [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]).sum()


def test_cityscapes_labels_pixel_by_pixel(tmp_path: Path) -> None:
    fmt = get_format("cityscapes")
    samples = fmt.list_samples(make_cityscapes(tmp_path), "train")
    for index, sample in enumerate(samples):
        label = fmt.read_label(Path(sample.label), NUM_CLASSES)
        assert np.array_equal(label, expected_cityscapes(label_ids_8bit(index)))


def test_synthia_labels_pixel_by_pixel(tmp_path: Path) -> None:
    fmt = get_format("synthia")
    samples = fmt.list_samples(make_synthia(tmp_path, count=4, channels=(3, 4)), "all")
    for index, sample in enumerate(samples):
        raw = synthia_class_ids(index)
        assert set(np.unique(raw).tolist()) == set(range(23))
        label = fmt.read_label(Path(sample.label), NUM_CLASSES)
        assert label.dtype == np.uint8 and label.shape == (16, 32)
        assert np.array_equal(label, expected_synthia(raw)), sample.label
    for synthia_id in range(23):
        assert set(label[raw == synthia_id].tolist()) == {DOCUMENTED_SYNTHIA.get(synthia_id, 255)}
    assert not np.isin(label, [9, 14, 16]).any()


# ---------------------------------------------------------------- bad labels


@pytest.mark.parametrize("writer", [write_palette_label, write_gray_label])
def test_unknown_labelid_raises_naming_file_and_value(tmp_path: Path, writer) -> None:
    raw = label_ids_8bit(0)
    raw[3, 4], raw[5, 6] = 200, 34
    path = tmp_path / "bad_label.png"
    writer(path, raw)
    with pytest.raises(DatasetError, match=r"\[34, 200\].*bad_label\.png"):
        read_label_ids(path, NUM_CLASSES)


@pytest.mark.parametrize("bad_id", [23, 300])
def test_unknown_synthia_id_raises(tmp_path: Path, bad_id: int) -> None:
    raw = synthia_class_ids(0)
    raw[2, 2] = bad_id
    path = tmp_path / "bad_synthia.png"
    write_png_16bit(path, np.stack([raw, raw, raw], axis=-1))
    with pytest.raises(DatasetError, match=rf"\[{bad_id}\].*bad_synthia\.png"):
        read_synthia_label(path, NUM_CLASSES)


def test_unexpected_label_files_raise(tmp_path: Path) -> None:
    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(colour)
    with pytest.raises(DatasetError, match=r"single-channel 8-bit.*colour\.png"):
        read_label_ids(colour, NUM_CLASSES)
    with pytest.raises(DatasetError, match=r"16-bit.*colour\.png"):
        read_synthia_label(colour, NUM_CLASSES)  # an 8-bit file is not a SYNTHIA label
    single = tmp_path / "single.png"
    write_png_16bit(single, np.zeros((4, 5), np.uint16))
    with pytest.raises(DatasetError, match=r"single\.png has uint16 with 1 channel"):
        read_synthia_label(single, NUM_CLASSES)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all" * 4)
    for reader in (read_label_ids, read_synthia_label):
        with pytest.raises(DatasetError, match="unreadable.*garbage"):
            reader(garbage, NUM_CLASSES)
        with pytest.raises(DatasetError, match="missing.*absent"):
            reader(tmp_path / "absent.png", NUM_CLASSES)
    with pytest.raises(DatasetError, match="num_classes=16"):
        read_label_ids(colour, 16)


# ---------------------------------------------------------------- listing


def test_gta5_listing_pairs_sorted(tmp_path: Path) -> None:
    root = make_gta5(tmp_path, count=3)
    samples = get_format("gta5").list_samples(root, "all")
    assert [sample.name for sample in samples] == ["00001", "00002", "00003"]
    for sample in samples:
        assert sample.image == str(root / "images" / f"{sample.name}.png")
        assert sample.label == str(root / "labels" / f"{sample.name}.png")
    with pytest.raises(DatasetError, match="no splits"):
        get_format("gta5").list_samples(root, "train")
    (root / "labels" / "00002.png").unlink()
    with pytest.raises(DatasetError, match=r"without a label.*00002\.png"):
        get_format("gta5").list_samples(root, "")


def test_cityscapes_listing(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path, split="val", cities=("frankfurt", "aachen"), per_city=2)
    samples = get_format("cityscapes").list_samples(root, "val")
    names = ["aachen_000000_000019", "aachen_000000_000029", "frankfurt_000000_000019", "frankfurt_000000_000029"]
    assert [sample.name for sample in samples] == names
    for sample in samples:
        city = sample.name.split("_")[0]
        assert sample.image == str(root / "leftImg8bit/val" / city / f"{sample.name}_leftImg8bit.png")
        assert sample.label == str(root / "gtFine/val" / city / f"{sample.name}_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match="split 'train'"):
        get_format("cityscapes").list_samples(root, "train")


def test_cityscapes_without_gtfine_gives_none_labels(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path, split="train", with_labels=False)
    samples = get_format("cityscapes").list_samples(root, "train")
    assert len(samples) == 4 and all(sample.label is None for sample in samples)


def test_synthia_listing_pairs_sorted(tmp_path: Path) -> None:
    root = make_synthia(tmp_path, count=3)
    samples = get_format("synthia").list_samples(root, "")
    assert [sample.name for sample in samples] == ["0000000", "0000001", "0000002"]
    assert [Path(sample.label).relative_to(root).as_posix() for sample in samples] == [
        f"GT/LABELS/000000{index}.png" for index in range(3)
    ]
    with pytest.raises(DatasetError, match="no image folder"):
        get_format("synthia").list_samples(tmp_path / "elsewhere", "")


def test_size_mismatch_is_detectable(tmp_path: Path) -> None:
    root = make_gta5(tmp_path, count=2)
    write_palette_label(root / "labels" / "00002.png", label_ids_8bit(1, size=(30, 16)))
    first, second = get_format("gta5").list_samples(root, "")
    width, height = image_size(first.image)
    check_same_size((height, width), read_label_ids(Path(first.label), NUM_CLASSES).shape, first)
    width, height = image_size(second.image)
    with pytest.raises(DatasetError, match=r"30x16.*32x16"):
        check_same_size((height, width), read_label_ids(Path(second.label), NUM_CLASSES).shape, second)


def test_gta5_labels_of_another_size_fail_the_index_or_are_resized_to_their_image(tmp_path: Path) -> None:
    """The real GTA5 release has pairs whose label size differs from the image: the default fails naming the pair;
    label_size_mismatch resize_label resizes the label by nearest neighbour (no new ids) and counts the pairs."""
    from bismap.data.index import index_dataset
    from bismap.data.loading import Manifest, SegmentationDataset

    root = make_gta5(tmp_path / "gta5", count=2)  # 32x16 images
    small = label_ids_8bit(1, size=(16, 8))  # (8, 16) labelIds: half the size
    write_palette_label(root / "labels" / "00002.png", small)
    with pytest.raises(DatasetError, match=r"00002.png is 16x8 but image .*00002.png is 32x16"):
        index_dataset("gta5", root, "", NUM_CLASSES, True, tmp_path / "strict.json")
    manifest = index_dataset("gta5", root, "", NUM_CLASSES, True, tmp_path / "gta5.json",
                             label_size_mismatch="resize_label")
    assert manifest["labels_resized"] == 1 and [item["resize_label"] for item in manifest["samples"]] == [False, True]
    label = SegmentationDataset(Manifest.load(tmp_path / "gta5.json"))[1]["label"].numpy()  # (16, 32)
    expected = np.repeat(np.repeat(expected_cityscapes(small), 2, axis=0), 2, axis=1)  # nearest, exact 2x
    assert label.shape == (16, 32) and np.array_equal(label, expected)
    assert sum(manifest["pixels_per_class"]) + manifest["ignored_pixels"] == 2 * 16 * 32
