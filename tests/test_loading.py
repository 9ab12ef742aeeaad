"""Manifests, dataset errors, augmentation alignment and the resumable batch order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bismap.data.index import index_dataset
from bismap.data.loading import AugmentSettings, Manifest, ResumableBatchSampler, SegmentationDataset, train_augmentation
from bismap.data.samples import DatasetError


def make_paired_folder(root: Path, count: int = 4, size: tuple[int, int] = (20, 24)) -> Path:
    """Images whose red channel encodes the label (value * 20), so alignment is checkable."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    generator = np.random.default_rng(0)
    for index in range(count):
        blocks = generator.integers(0, 5, size=(size[0] // 4, size[1] // 4))
        label = np.kron(blocks, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)  # 4x4 blocks of one class
        image = np.stack([label * 20, np.full(size, 7), np.full(size, 9)], axis=-1).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"scene_{index}.png")
        Image.fromarray(label).save(root / "labels" / f"scene_{index}.png")
    return root


def test_index_counts_pixels_per_class(tmp_path):
    root = make_paired_folder(tmp_path / "data")
    manifest = index_dataset("digit_scenes", root, "", 5, True, tmp_path / "manifest.json")
    labels = np.stack([np.array(Image.open(root / "labels" / f"scene_{i}.png")) for i in range(4)])
    assert manifest["pixels_per_class"] == np.bincount(labels.ravel(), minlength=5).tolist()
    assert json.loads((tmp_path / "manifest.json").read_text())["count"] == 4


@pytest.mark.parametrize("damage,message", [
    ("missing_image", "missing"),
    ("unreadable_image", "unreadable"),
    ("wrong_size", "is 24x20 but image"),
    ("bad_value", "[9]"),
])
def test_bad_files_fail_naming_the_file_and_write_nothing(tmp_path, damage, message):
    root = make_paired_folder(tmp_path / "data")
    output = tmp_path / "manifest.json"
    output.write_text("earlier manifest\n")
    victim = "scene_2.png"
    if damage == "missing_image":
        (root / "images" / victim).unlink()
        (root / "images" / "scene_2.png").symlink_to(root / "images" / "gone.png")
    elif damage == "unreadable_image":
        (root / "images" / victim).write_bytes(b"not a png")
    elif damage == "wrong_size":
        Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(root / "images" / victim)
    else:
        Image.fromarray(np.full((20, 24), 9, np.uint8)).save(root / "labels" / victim)
    with pytest.raises(DatasetError) as error:
        index_dataset("digit_scenes", root, "", 5, True, output)
    assert message in str(error.value) and victim in str(error.value)
    assert output.read_text() == "earlier manifest\n"  # the earlier output is intact
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_augmentation_keeps_image_and_label_aligned(tmp_path):
    root = make_paired_folder(tmp_path / "data")
    index_dataset("digit_scenes", root, "", 5, True, tmp_path / "manifest.json")
    settings = AugmentSettings(crop_size=(16, 16), scale_range=(1.0, 2.0), horizontal_flip=True,
                               color_jitter=(0.0, 0.0, 0.0, 0.0))
    dataset = SegmentationDataset(Manifest.load(tmp_path / "manifest.json"), train_augmentation(settings),
                                  mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for seed in range(6):
        item = dataset[(seed % 4, seed)]
        label = item["label"]
        valid = label != 255
        # nearest-resized label vs the bilinear image: compare where the 3x3 label patch is uniform
        uniform = valid.clone()
        padded = torch.nn.functional.pad(label[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]
        for dy in range(3):
            for dx in range(3):
                uniform &= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
        decoded = torch.round(item["image"][0] * 255 / 20)
        assert uniform.sum() > 20
        assert torch.equal(decoded[uniform], label[uniform].float())


def test_same_seed_gives_same_augmented_item(tmp_path):
    root = make_paired_folder(tmp_path / "data")
    index_dataset("digit_scenes", root, "", 5, True, tmp_path / "manifest.json")
    dataset = SegmentationDataset(Manifest.load(tmp_path / "manifest.json"),
                                  train_augmentation(AugmentSettings(crop_size=(16, 16))))
    first, second, other = dataset[(1, 42)], dataset[(1, 42)], dataset[(1, 43)]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])
    assert not torch.equal(first["image"], other["image"])


def test_sampler_resumes_exactly_and_covers_each_epoch():
    full = list(ResumableBatchSampler(10, 4, seed=3, iterations=6))
    resumed = list(ResumableBatchSampler(10, 4, seed=3, iterations=6, start_iteration=4))
    assert resumed == full[4:]
    first_epoch = [index for batch in full for index, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))
    seeds = [seed for batch in full for _, seed in batch]
    assert len(set(seeds)) == len(seeds)


def test_a_file_changed_after_indexing_fails_where_the_manifest_is_loaded(tmp_path):
    from bismap.data.digit_scenes import DigitScenesSettings, generate_split
    from bismap.data.index import index_dataset
    from bismap.data.samples import DatasetError, Manifest

    settings = DigitScenesSettings(image_size=32, digit_size=(12, 16), digits_per_image=(1, 1))
    generate_split(tmp_path / "source", "source", count=3, seed=1, settings=settings)
    index_dataset("digit_scenes", tmp_path / "source", "", 11, True, tmp_path / "source.json")
    manifest = Manifest.load(tmp_path / "source.json")  # unchanged: loads
    image = Path(manifest.samples[1].image)
    image.write_bytes(image.read_bytes()[:40])  # truncated after indexing
    with pytest.raises(DatasetError, match=rf"{image.name} changed after it was indexed in .*source.json"):
        Manifest.load(tmp_path / "source.json")
    assert len(Manifest.load(tmp_path / "source.json", verify=False).samples) == 3
    image.unlink()
    with pytest.raises(DatasetError, match=rf"{image.name} was indexed in .* but is missing now"):
        Manifest.load(tmp_path / "source.json")
