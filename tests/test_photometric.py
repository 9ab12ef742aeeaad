"""Tests for Global Photometric Alignment (bismap.data.photometric; BiSMAP Sec. 3.5, ref. [24])."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2lab

from bismap.data.photometric import (
    align_image,
    compute_target_statistics,
    load_statistics,
    save_statistics,
    write_preview,
)


def scene(seed: int, low: float, high: float, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A structured (gradients + noise) RGB uint8 image with values in [low, high]."""
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    base = np.stack([columns / width, rows / height, (rows + columns) / (height + width)], axis=-1)
    noise = np.random.default_rng(seed).random((height, width, 3))
    return np.clip(low + (high - low) * (0.7 * base + 0.3 * noise), 0, 255).astype(np.uint8)


def save(folder: Path, name: str, image: np.ndarray) -> str:
    path = folder / f"{name}.png"
    Image.fromarray(image).save(path)
    return str(path)


@pytest.fixture
def bright_targets(tmp_path: Path) -> list[str]:
    """Four bright, yellowish target images (mean L ~78.5, b ~ +20)."""
    paths = []
    for index in range(4):
        image = scene(10 + index, 140, 255)
        image[..., 2] = (image[..., 2] * 0.8).astype(np.uint8)
        paths.append(save(tmp_path, f"target_{index}", image))
    return paths


def pooled_lab(paths: list[str]) -> np.ndarray:
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(rgb2lab(np.asarray(image)).reshape(-1, 3))
    return np.concatenate(arrays)


def test_statistics_are_the_pooled_cielab_moments(bright_targets: list[str]) -> None:
    stats = compute_target_statistics(bright_targets, max_images=10, seed=0, bins=128)
    lab = pooled_lab(bright_targets)
    assert stats["num_images"] == 4 and stats["num_pixels"] == lab.shape[0] == 4 * 48 * 64
    assert len(stats["l_cdf"]) == 128 and stats["l_cdf"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(stats["l_cdf"]) >= 0)
    assert stats["a_mean"] == pytest.approx(lab[:, 1].mean(), abs=1e-3)
    assert stats["b_mean"] == pytest.approx(lab[:, 2].mean(), abs=1e-3)
    assert stats["a_std"] == pytest.approx(lab[:, 1].std(), abs=1e-3)
    assert stats["b_std"] == pytest.approx(lab[:, 2].std(), abs=1e-3)
    # CDF at the upper edge of bin k = share of pixels with L < (k + 1) * 100 / bins
    for bin_index in (60, 90, 110):
        share = np.mean(lab[:, 0] < (bin_index + 1) * 100 / 128)
        assert stats["l_cdf"][bin_index] == pytest.approx(share, abs=1e-6)
    assert stats["l_mean"] == pytest.approx(lab[:, 0].mean(), abs=0.4)  # bin centres: within half a bin
    json.dumps(stats)  # plain types only


def test_statistics_deterministic_for_a_seed(tmp_path: Path) -> None:
    paths = [save(tmp_path, f"image_{index}", scene(index, 10 * index, 150 + 10 * index)) for index in range(6)]
    first = compute_target_statistics(paths, max_images=3, seed=1)
    assert first == compute_target_statistics(paths, max_images=3, seed=1)
    assert first["num_images"] == 3 and len(set(first["images"])) == 3
    chosen = {tuple(compute_target_statistics(paths, max_images=3, seed=seed)["images"]) for seed in range(5)}
    assert len(chosen) > 1  # the seed does pick the sample
    assert compute_target_statistics(paths, max_images=6, seed=9)["images"] == [Path(path).name for path in paths]


def test_align_to_own_statistics_changes_little(tmp_path: Path) -> None:
    """Bound: mean |difference| <= 0.05 grey levels, max <= 2 (measured: exactly 0)."""
    image = scene(0, 20, 230)
    stats = compute_target_statistics([save(tmp_path, "self", image)], max_images=1, seed=0)
    aligned = align_image(image, stats)
    difference = np.abs(aligned.astype(int) - image.astype(int))
    assert aligned.dtype == np.uint8 and aligned.shape == image.shape
    assert difference.mean() <= 0.05 and difference.max() <= 2


def test_dark_image_takes_the_bright_target_photometry(bright_targets: list[str]) -> None:
    """L, a and b means (and stds) of the result within 0.5 CIELAB units of the target's."""
    stats = compute_target_statistics(bright_targets, max_images=10, seed=0)
    target = pooled_lab(bright_targets)
    dark = scene(5, 0, 90)
    assert rgb2lab(dark)[..., 0].mean() < 25 < 75 < target[:, 0].mean()
    aligned = rgb2lab(align_image(dark, stats)).reshape(-1, 3)
    for channel in range(3):
        assert aligned[:, channel].mean() == pytest.approx(target[:, channel].mean(), abs=0.5), channel
        assert aligned[:, channel].std() == pytest.approx(target[:, channel].std(), abs=0.5), channel


def test_align_is_pure_and_checks_its_input(bright_targets: list[str]) -> None:
    stats = compute_target_statistics(bright_targets, max_images=10, seed=0)
    image = scene(3, 0, 255)
    copy = image.copy()
    assert np.array_equal(align_image(image, stats), align_image(image, stats))
    assert np.array_equal(image, copy)
    with pytest.raises(ValueError, match="RGB uint8"):
        align_image(image.astype(np.float32), stats)
    flat = np.full((8, 8, 3), 128, np.uint8)  # a/b std 0: only shifted, no division by 0
    assert np.isfinite(rgb2lab(align_image(flat, stats))).all()


def test_statistics_file_round_trip(tmp_path: Path, bright_targets: list[str]) -> None:
    stats = compute_target_statistics(bright_targets, max_images=2, seed=4)
    path = tmp_path / "stats" / "gpa.json"
    save_statistics(path, stats)
    assert load_statistics(path) == stats
    path.write_text(json.dumps({**stats, "l_cdf": stats["l_cdf"][:-1]}))
    with pytest.raises(ValueError, match="l_cdf"):
        load_statistics(path)
    with pytest.raises(ValueError, match="a_std"):
        save_statistics(path, {key: value for key, value in stats.items() if key != "a_std"})


def test_preview_is_a_png_grid_of_the_expected_size(tmp_path: Path, bright_targets: list[str]) -> None:
    stats = compute_target_statistics(bright_targets, max_images=10, seed=0)
    sources = [save(tmp_path, f"source_{index}", scene(20 + index, 0, 90)) for index in range(2)]
    path = tmp_path / "preview" / "gpa.png"
    write_preview(path, sources, stats, bright_targets, rows=3, tile_width=32, gap=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as preview:
        assert preview.format == "PNG" and preview.mode == "RGB"
        assert preview.size == (3 * 32 + 2 * 4, 2 * 24 + 4)  # 2 source images -> 2 rows; 64x48 -> 32x24 tiles
        grid = np.asarray(preview).astype(int)
    assert (grid[24:28] == 255).all() and (grid[:, 32:36] == 255).all()  # white gaps
    source_tile, stylized_tile = grid[:24, :32], grid[:24, 36:68]
    assert stylized_tile.mean() > source_tile.mean() + 60  # the dark source got brighter
    assert not list(path.parent.glob("*.tmp"))
