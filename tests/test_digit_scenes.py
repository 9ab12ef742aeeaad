"""Tests for the embedded digit scenes benchmark (bismap.data.digit_scenes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bismap.data import digit_scenes
from bismap.data.digit_scenes import (
    BACKGROUND_CLASS,
    IGNORE_INDEX,
    NUM_CLASSES,
    SPLITS,
    DigitScenesSettings,
    digit_pool,
    generate_split,
    parse_settings,
)
from bismap.settings import SettingsError

COUNT = 12
SETTINGS = DigitScenesSettings()


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, for byte-for-byte comparison."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _read(folder: Path, kind: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted((folder / kind).glob("*.png"))]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small set per split, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("digit_scenes")
    for seed, split in enumerate(SPLITS, start=1):
        generate_split(root / split, split, COUNT, seed, SETTINGS)
    return {split: root / split for split in SPLITS}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    generate_split(tmp_path / "first", "source", COUNT, 7, SETTINGS)
    generate_split(tmp_path / "again", "source", COUNT, 7, SETTINGS)
    generate_split(tmp_path / "other", "source", COUNT, 8, SETTINGS)
    first, again, other = (_files(tmp_path / name) for name in ("first", "again", "other"))
    assert len(first) == 2 * COUNT + 1
    assert first == again
    differing = [name for name in first if name.startswith("images/") and first[name] != other[name]]
    assert len(differing) == COUNT


def test_images_depend_only_on_seed_and_index(tmp_path: Path) -> None:
    generate_split(tmp_path / "short", "target_val", 3, 5, SETTINGS)
    generate_split(tmp_path / "long", "target_val", COUNT, 5, SETTINGS)
    short, long = _files(tmp_path / "short"), _files(tmp_path / "long")
    for name, content in short.items():
        if name != "summary.json":
            assert long[name] == content


def test_digit_pools_are_disjoint_and_cover_all_digits() -> None:
    pools = {split: set(digit_pool(split).tolist()) for split in SPLITS}
    assert [len(pools[split]) for split in SPLITS] == [898, 449, 450]
    assert pools["source"] & pools["target_train"] == set()
    assert pools["source"] & pools["target_val"] == set()
    assert pools["target_train"] & pools["target_val"] == set()
    assert set.union(*pools.values()) == set(range(1797))


def test_labels_hold_only_known_values_and_match_summary(generated: dict[str, Path]) -> None:
    allowed = set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    for split, folder in generated.items():
        labels = _read(folder, "labels")
        assert len(labels) == COUNT
        counts = np.zeros(256, dtype=np.int64)
        for label in labels:
            assert label.dtype == np.uint8
            assert set(np.unique(label).tolist()) <= allowed
            counts += np.bincount(label.ravel(), minlength=256)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["images"] == COUNT
        assert summary["pixels_per_class"] == counts[:NUM_CLASSES].tolist()
        assert summary["ignore_pixels"] == int(counts[IGNORE_INDEX])
        assert sum(summary["pixels_per_class"]) + summary["ignore_pixels"] == COUNT * 64 * 64


def test_every_scene_has_digits_and_a_sane_background_fraction(generated: dict[str, Path]) -> None:
    for folder in generated.values():
        for label in _read(folder, "labels"):
            digit_classes = set(np.unique(label).tolist()) - {BACKGROUND_CLASS, IGNORE_INDEX}
            assert len(digit_classes) >= 1
            assert 0.4 <= float(np.mean(label == BACKGROUND_CLASS)) <= 0.98
            # The ignore band is a thin border around strokes, not a large area.
            assert 0.0 < float(np.mean(label == IGNORE_INDEX)) < 0.3


def test_source_is_grey_and_target_is_colour(generated: dict[str, Path]) -> None:
    for image in _read(generated["source"], "images"):
        assert image.shape == (64, 64, 3)
        assert np.array_equal(image[..., 0], image[..., 1])
        assert np.array_equal(image[..., 0], image[..., 2])
    for split in ("target_train", "target_val"):
        for image in _read(generated[split], "images"):
            channel_gap = np.abs(image[..., 0].astype(int) - image[..., 1].astype(int)).mean()
            assert channel_gap > 1.0


def test_stroke_pixels_follow_the_digit_ink(generated: dict[str, Path]) -> None:
    """Source strokes are drawn in pure black or white ink, so they stand out from the texture."""
    for image, label in zip(_read(generated["source"], "images"), _read(generated["source"], "labels")):
        grey = image[..., 0].astype(float)
        stroke, background = grey[label < BACKGROUND_CLASS], grey[label == BACKGROUND_CLASS]
        assert abs(stroke.mean() - background.mean()) > 20.0


def test_source_only_setting_leaves_target_bytes_identical(tmp_path: Path) -> None:
    changed = dataclasses.replace(SETTINGS, source_contrast=(0.1, 0.2))
    generate_split(tmp_path / "default", "target_train", COUNT, 3, SETTINGS)
    generate_split(tmp_path / "changed", "target_train", COUNT, 3, changed)
    assert _files(tmp_path / "default") == _files(tmp_path / "changed")
    generate_split(tmp_path / "source_default", "source", 4, 3, SETTINGS)
    generate_split(tmp_path / "source_changed", "source", 4, 3, changed)
    assert _files(tmp_path / "source_default") != _files(tmp_path / "source_changed")


def test_unknown_split_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="target_test"):
        generate_split(tmp_path / "out", "target_test", 2, 0, SETTINGS)
    with pytest.raises(ValueError, match="validation"):
        digit_pool("validation")
    assert not (tmp_path / "out").exists()


def test_settings_are_parsed_strictly() -> None:
    parsed = parse_settings({"image_size": 48, "digit_size": [12, 20]})
    assert parsed.digit_size == (12, 20)
    assert parsed.image_size == 48
    with pytest.raises(SettingsError, match="colour"):
        parse_settings({"colour": True})
    with pytest.raises(SettingsError, match="digit_size"):
        parse_settings({"image_size": 16, "digit_size": [16, 24]})


def test_failure_mid_generation_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    render = digit_scenes._render_scene
    calls = []

    def failing_render(*arguments: object, **keywords: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated crash")
        return render(*arguments, **keywords)

    monkeypatch.setattr(digit_scenes, "_render_scene", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_split(tmp_path / "out", "source", COUNT, 1, SETTINGS)
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []
