"""Global Photometric Alignment (GPA) of source images to the target domain.

BiSMAP (Sec. 3.5 and 4.2) stylizes every source image with the GPA of its
ref. [24] (Ma et al., "Coarse-to-Fine Domain Adaptive Semantic Segmentation
with Photometric Alignment and Category-Center Regularization", CVPR 2021)
before the warmup and keeps the stylized source for self-training. No public
code of [24] exists; this module implements its documented approximation,
exactly as follows:

1. Target statistics (:func:`compute_target_statistics`, once per target
   domain): a seeded sample of at most ``max_images`` target images is
   converted to CIELAB with ``skimage.color.rgb2lab`` (sRGB, D65). Pooled over
   all their pixels:

   * L (lightness): a histogram over ``bins`` equal bins on [0, 100], stored as
     its cumulative distribution ``l_cdf`` (the CDF at the upper bin edges);
   * a and b (chroma): mean and standard deviation.

2. Alignment of one source image (:func:`align_image`), in CIELAB:

   * L: histogram matching. The image's own L histogram (same bins) gives its
     CDF; each pixel's L goes through that CDF (linear within a bin) and then
     through the inverse of the target CDF (linear interpolation), so the
     image's L distribution becomes the target's;
   * a and b: each channel is standardised with the image's own mean and
     standard deviation and rescaled to the target's (mean/std matching);
   * back to sRGB with ``skimage.color.lab2rgb``, clipped to [0, 1], rounded
     to uint8. Nothing else (no per-class or local alignment; target images
     are not changed).

Stylization is applied on the fly in the source data loader, from the
statistics JSON written here (:func:`save_statistics`), not materialized on
disk: GTA5 is ~25k full-HD images (~50+ GB as PNG if written out again), and
the statistics file is a few kilobytes. :func:`align_image` is a pure
function of (image, statistics), so worker processes need no shared state.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from skimage.color import lab2rgb, rgb2lab
from bismap.progress import tqdm

from bismap.data.samples import Manifest, open_image
from bismap.io import read_json, write_json, write_png

logger = logging.getLogger(__name__)

L_RANGE = (0.0, 100.0)  # CIELAB lightness range
STATISTICS_KEYS = ("bins", "l_cdf", "a_mean", "a_std", "b_mean", "b_std")
MINIMUM_STD = 1e-6  # a flat a/b channel is only shifted, never divided by ~0


def _to_lab(image_rgb_uint8: np.ndarray) -> np.ndarray:
    if image_rgb_uint8.dtype != np.uint8 or image_rgb_uint8.ndim != 3 or image_rgb_uint8.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image_rgb_uint8.dtype} {image_rgb_uint8.shape}")
    return rgb2lab(image_rgb_uint8.astype(np.float32) / np.float32(255.0))


def _l_histogram(lightness: np.ndarray, bins: int) -> np.ndarray:
    counts, _ = np.histogram(lightness, bins=bins, range=L_RANGE)
    return counts.astype(np.float64)


def _choose_images(image_paths: Sequence[str], max_images: int, seed: int) -> list[str]:
    """A seeded subset (kept in the given order) of at most ``max_images`` paths."""
    if not image_paths:
        raise ValueError("no target images to compute photometric statistics from")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if len(image_paths) <= max_images:
        return list(image_paths)
    chosen = np.random.default_rng(seed).choice(len(image_paths), size=max_images, replace=False)
    return [image_paths[index] for index in sorted(chosen.tolist())]


def compute_target_statistics(
    image_paths: list[str], max_images: int, seed: int, bins: int = 256
) -> dict[str, Any]:
    """Pooled CIELAB statistics of (a seeded sample of) target images; JSON-ready."""
    chosen = _choose_images(image_paths, max_images, seed)
    l_counts = np.zeros(bins, dtype=np.float64)
    sums = np.zeros(2, dtype=np.float64)  # a, b
    squares = np.zeros(2, dtype=np.float64)
    for path in tqdm(chosen, desc="target photometric statistics", unit="image"):
        lab = _to_lab(open_image(path)).reshape(-1, 3).astype(np.float64)
        l_counts += _l_histogram(lab[:, 0], bins)
        sums += lab[:, 1:].sum(axis=0)
        squares += np.square(lab[:, 1:]).sum(axis=0)
    pixels = l_counts.sum()
    means = sums / pixels
    stds = np.sqrt(np.maximum(squares / pixels - np.square(means), 0.0))
    centers = np.linspace(*L_RANGE, bins + 1)[:-1] + (L_RANGE[1] - L_RANGE[0]) / (2 * bins)
    logger.info("photometric statistics from %d image(s), %d pixels", len(chosen), int(pixels))
    return {
        "color_space": "CIELAB (skimage.color.rgb2lab, D65)",
        "bins": bins,
        "l_range": list(L_RANGE),
        "l_cdf": (np.cumsum(l_counts) / pixels).tolist(),
        "l_mean": float((l_counts * centers).sum() / pixels),  # from bin centres, for reports
        "a_mean": float(means[0]),
        "a_std": float(stds[0]),
        "b_mean": float(means[1]),
        "b_std": float(stds[1]),
        "num_images": len(chosen),
        "num_pixels": int(pixels),
        "seed": seed,
        "images": [os.path.basename(path) for path in chosen],
    }


def check_statistics(stats: dict[str, Any]) -> None:
    """Required keys present, ``l_cdf`` of length ``bins``, non-decreasing, ending at 1."""
    missing = [key for key in STATISTICS_KEYS if key not in stats]
    if missing:
        raise ValueError(f"photometric statistics lack key(s) {missing}")
    cdf = np.asarray(stats["l_cdf"], dtype=np.float64)
    if cdf.shape != (stats["bins"],) or np.any(np.diff(cdf) < 0) or not np.isclose(cdf[-1], 1.0):
        raise ValueError("photometric statistics: l_cdf must have 'bins' non-decreasing values ending at 1")


def save_statistics(path: str | os.PathLike[str], stats: dict[str, Any]) -> None:
    check_statistics(stats)
    write_json(path, stats)


def load_statistics(path: str | os.PathLike[str]) -> dict[str, Any]:
    stats = read_json(path)
    check_statistics(stats)
    return stats


def _match_lightness(lightness: np.ndarray, target_cdf: np.ndarray) -> np.ndarray:
    """Histogram matching of L (GPA, ref. [24] of BiSMAP): own CDF, then inverse target CDF."""
    bins = target_cdf.size
    edges = np.linspace(*L_RANGE, bins + 1)
    own_cdf = np.concatenate(([0.0], np.cumsum(_l_histogram(lightness, bins)) / lightness.size))
    quantiles = np.interp(lightness, edges, own_cdf)
    # strictly increasing x for np.interp: flat (empty) target bins get a 1e-12 ramp
    target_x = np.concatenate(([0.0], target_cdf)) + np.arange(bins + 1) * 1e-12
    return np.interp(quantiles, target_x, edges).astype(np.float32)


def _match_moments(channel: np.ndarray, target_mean: float, target_std: float) -> np.ndarray:
    """Mean/std matching of one chroma channel (a or b) to the target's."""
    mean, std = float(channel.mean(dtype=np.float64)), float(channel.std(dtype=np.float64))
    scale = target_std / std if std > MINIMUM_STD else 1.0
    return ((channel - mean) * scale + target_mean).astype(np.float32)


def align_image(image_rgb_uint8: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Stylize one RGB uint8 image with the target statistics; returns RGB uint8."""
    lab = _to_lab(image_rgb_uint8)
    lab[..., 0] = _match_lightness(lab[..., 0], np.asarray(stats["l_cdf"], dtype=np.float64))
    lab[..., 1] = _match_moments(lab[..., 1], stats["a_mean"], stats["a_std"])
    lab[..., 2] = _match_moments(lab[..., 2], stats["b_mean"], stats["b_std"])
    with warnings.catch_warnings():
        # out-of-gamut colours are expected here and clipped just below
        warnings.filterwarnings("ignore", message=".*negative Z values.*")
        rgb = lab2rgb(lab)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _tile(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def write_preview(
    path: str | os.PathLike[str],
    source_paths: list[str],
    stats: dict[str, Any],
    target_paths: list[str],
    rows: int = 3,
    tile_width: int = 384,
    gap: int = 4,
) -> None:
    """PNG grid, one row per source image: source | stylized | a target image.

    Tiles are ``tile_width`` wide with the first source image's aspect ratio;
    the PNG is ``3 * tile_width + 2 * gap`` by ``rows * tile_height + (rows - 1) * gap``
    pixels (fewer rows if fewer source images), white between tiles.
    """
    rows = min(rows, len(source_paths))
    if rows < 1 or not target_paths:
        raise ValueError("write_preview needs at least one source and one target image")
    first = open_image(source_paths[0])
    tile_height = max(1, round(tile_width * first.shape[0] / first.shape[1]))
    size = (tile_width, tile_height)
    canvas = np.full((rows * tile_height + (rows - 1) * gap, 3 * tile_width + 2 * gap, 3), 255, np.uint8)
    for row in range(rows):
        source = open_image(source_paths[row])
        target = open_image(target_paths[row % len(target_paths)])
        for column, image in enumerate((source, align_image(source, stats), target)):
            top, left = row * (tile_height + gap), column * (tile_width + gap)
            canvas[top : top + tile_height, left : left + tile_width] = _tile(image, size)
    write_png(path, canvas)
    logger.info("photometric alignment preview (%d rows) written to %s", rows, path)


def compute_and_write(
    target_manifest: str | os.PathLike[str],
    source_manifest: str | os.PathLike[str],
    statistics_path: str | os.PathLike[str],
    preview_path: str | os.PathLike[str],
    max_images: int,
    seed: int,
    preview_rows: int = 3,
) -> dict[str, Any]:
    """Rule gpa_statistics: target statistics JSON from a manifest, plus a preview PNG.

    The statistics pool a ``seed``-ed sample of at most ``max_images`` target
    images; the preview shows ``preview_rows`` seeded source images before and
    after alignment, each next to a (seeded) target image.
    """
    target_paths = [sample.image for sample in Manifest.load(target_manifest).samples]
    source_paths = [sample.image for sample in Manifest.load(source_manifest).samples]
    stats = compute_target_statistics(target_paths, max_images, seed)
    save_statistics(statistics_path, stats)
    logger.info("target L mean %.1f, a %.2f +- %.2f, b %.2f +- %.2f", stats["l_mean"], stats["a_mean"],
                stats["a_std"], stats["b_mean"], stats["b_std"])
    previewed = _choose_images(source_paths, preview_rows, seed)
    shown_targets = _choose_images(target_paths, preview_rows, seed + 1)
    write_preview(preview_path, previewed, stats, shown_targets, rows=preview_rows)
    return stats
