"""Source feature extraction (BiSMAP Eq. 3): cell-centre labels, correct pixels only, seeded reservoir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bismap.data.index import index_dataset
from bismap.data.loading import IMAGENET_MEAN, IMAGENET_STD
from bismap.labels import features as features_module
from bismap.labels.features import (ClassReservoir, FeatureSettings, downsample_label, extract_source_features,
                                    priority_keys, read_class_features, read_feature_info)
from bismap.models import ModelSettings, SegmentationOutput, build_model
from bismap.training.checkpoint import save_checkpoint

CLASSES = ["zero", "one", "two"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_downsample_label_takes_the_centre_pixel_of_each_cell():
    label = torch.arange(32 * 32).view(1, 32, 32)
    assert torch.equal(downsample_label(label, (8, 8)), label[..., 2::4, 2::4])
    uneven = torch.arange(30 * 30).view(1, 30, 30)  # 8 cells of 3.75 pixels: centres floor((i + .5) * 3.75)
    rows = [1, 5, 9, 13, 16, 20, 24, 28]
    assert torch.equal(downsample_label(uneven, (8, 8)), uneven[:, rows][:, :, rows])


def offer_all(capacity: int, images: int, pixels: int, seed: int, group: int) -> ClassReservoir:
    """Offer pixel ids of ``images`` images of ``pixels`` pixels, ``group`` images per call."""
    reservoir = ClassReservoir(capacity, feature_dim=1)
    for first in range(0, images, group):
        indices = range(first, min(first + group, images))
        keys = torch.cat([priority_keys(seed, index, pixels) for index in indices])
        ids = torch.cat([torch.arange(index * pixels, (index + 1) * pixels) for index in indices]).float()
        reservoir.offer(keys, ids[:, None])
    return reservoir


def test_reservoir_keeps_smallest_keys_whatever_the_grouping():
    single = offer_all(capacity=2000, images=200, pixels=100, seed=7, group=1)
    kept = single.result()[:, 0].long()
    grouped = offer_all(capacity=2000, images=200, pixels=100, seed=7, group=13).result()[:, 0].long()
    assert torch.equal(kept, grouped) and single.seen == 20_000 and len(kept) == 2000
    all_keys = torch.cat([priority_keys(7, index, 100) for index in range(200)])
    expected = torch.argsort(all_keys)[:2000]  # the definition: the 2000 smallest keys, by key
    assert torch.equal(kept, expected)
    counts = np.bincount(kept.numpy() // 2000, minlength=10)  # 10 bins of 2000 ids: ~200 each
    assert counts.min() > 150 and counts.max() < 250
    other_seed = offer_all(capacity=2000, images=200, pixels=100, seed=8, group=1).result()[:, 0].long()
    assert len(np.intersect1d(other_seed.numpy(), kept.numpy())) < 400  # ~10% overlap by chance
    assert len(offer_all(capacity=50_000, images=20, pixels=100, seed=7, group=3).result()) == 2000


class ColourCodedModel(nn.Module):
    """A fake segmentor: class = red // 50, features = (green, blue, row, column) at cell centres."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(4, len(CLASSES), 1)

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        raw = ((images * std + mean) * 255).round()[..., 2::4, 2::4]  # (B, 3, h, w)
        logits = nn.functional.one_hot((raw[:, 0] // 50).long(), len(CLASSES)).permute(0, 3, 1, 2).float()
        rows, columns = torch.meshgrid(torch.arange(raw.shape[2]), torch.arange(raw.shape[3]), indexing="ij")
        position = torch.stack([rows, columns]).float().expand(len(images), -1, -1, -1)
        return SegmentationOutput(logits, torch.cat([raw[:, 1:], position], dim=1))


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    """3 images of 32 x 32 with random per-pixel classes and labels (so cells are not uniform)."""
    folder = tmp_path_factory.mktemp("colour")
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    rng = np.random.default_rng(0)
    pairs = []
    for index in range(3):
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        image[..., 0] = 50 * rng.integers(0, 3, (32, 32))  # predicted class
        image[..., 1] = 10 * index  # image id
        image[..., 2] = rng.integers(0, 256, (32, 32))
        label = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), (32, 32), p=[0.3, 0.3, 0.3, 0.1])
        Image.fromarray(image).save(folder / "images" / f"scene_{index}.png")
        Image.fromarray(label).save(folder / "labels" / f"scene_{index}.png")
        pairs.append((image, label))
    index_dataset("digit_scenes", folder, "", len(CLASSES), True, folder / "manifest.json")
    return folder / "manifest.json", pairs


def expected_rows(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, set[tuple[float, ...]]]:
    """Eq. 3 by hand: cell (i, j) is kept for class c when label and prediction at (4i+2, 4j+2) are c."""
    rows: dict[int, set[tuple[float, ...]]] = {c: set() for c in range(len(CLASSES))}
    for image, label in pairs:
        for i in range(8):
            for j in range(8):
                y, x = 4 * i + 2, 4 * j + 2
                if label[y, x] != 255 and label[y, x] == image[y, x, 0] // 50:
                    rows[int(label[y, x])].add((float(image[y, x, 1]), float(image[y, x, 2]), float(i), float(j)))
    return rows


def run_extraction(tmp_path: Path, manifest: Path, monkeypatch, **settings) -> Path:
    checkpoint = tmp_path / "fake.pt"
    checkpoint.write_bytes(b"fake checkpoint")
    monkeypatch.setattr(features_module, "load_model",
                        lambda path, device: (ColourCodedModel(), {"class_names": CLASSES}))
    output = tmp_path / f"features_{len(list(tmp_path.glob('*.h5')))}.h5"
    extract_source_features(checkpoint, manifest, output, FeatureSettings(**settings), torch.device("cpu"))
    return output


def test_only_correctly_classified_pixels_are_kept(tmp_path, colour_dataset, monkeypatch):
    manifest, pairs = colour_dataset
    path = run_extraction(tmp_path, manifest, monkeypatch, features_per_class=10_000, batch_size=2)
    expected = expected_rows(pairs)
    info = read_feature_info(path)
    for class_id in range(len(CLASSES)):
        rows = read_class_features(path, class_id)
        assert rows.dtype == np.float32 and rows.shape[1] == 4
        assert {tuple(row) for row in rows.tolist()} == expected[class_id] and len(rows) == len(expected[class_id])
    assert info.pixels_seen_per_class == info.pixels_kept_per_class == tuple(len(expected[c]) for c in range(3))
    with h5py.File(path, "r") as handle:
        labelled = [sum(int((label[2::4, 2::4] == c).sum()) for _, label in pairs) for c in range(3)]
        assert handle.attrs["pixels_labelled_per_class"].tolist() == labelled
        assert handle.attrs["checkpoint_sha256"] == hashlib.sha256(b"fake checkpoint").hexdigest()
        assert json.loads(handle.attrs["settings"])["features_per_class"] == 10_000
    assert info.class_names == tuple(CLASSES) and info.feature_dim == 4


def test_per_class_cap_is_deterministic_and_independent_of_batch_size(tmp_path, colour_dataset, monkeypatch):
    manifest, pairs = colour_dataset
    one = run_extraction(tmp_path, manifest, monkeypatch, features_per_class=5, batch_size=1, seed=3)
    three = run_extraction(tmp_path, manifest, monkeypatch, features_per_class=5, batch_size=3, seed=3)
    expected = expected_rows(pairs)
    for class_id in range(len(CLASSES)):
        rows = read_class_features(one, class_id)
        assert np.array_equal(rows, read_class_features(three, class_id)) and len(rows) == 5
        assert {tuple(row) for row in rows.tolist()} <= expected[class_id]
    assert read_feature_info(one).pixels_seen_per_class == tuple(len(expected[c]) for c in range(3))


def test_extraction_runs_a_real_tiny_model(tmp_path, colour_dataset):
    manifest, pairs = colour_dataset
    settings = ModelSettings(backbone_depth=18, backbone_width=8, output_stride=8, aspp_rates=(2,),
                             aspp_channels=16, low_level_channels=8, feature_dim=16)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", build_model(settings, len(CLASSES)), settings, CLASSES, 0, {})
    summary = extract_source_features(tmp_path / "model.pt", manifest, tmp_path / "features.h5",
                                      FeatureSettings(features_per_class=20), torch.device("cpu"))
    info = read_feature_info(tmp_path / "features.h5")
    assert info.feature_dim == 16 and summary["pixels_kept_per_class"] == list(info.pixels_kept_per_class)
    assert all(kept == min(seen, 20) for kept, seen in zip(info.pixels_kept_per_class, info.pixels_seen_per_class))
    labelled = [sum(int((label[2::4, 2::4] == c).sum()) for _, label in pairs) for c in range(3)]
    assert summary["pixels_labelled_per_class"] == labelled
    assert all(seen <= total for seen, total in zip(summary["pixels_seen_per_class"], labelled))
    assert read_class_features(tmp_path / "features.h5", 0).shape == (info.pixels_kept_per_class[0], 16)
