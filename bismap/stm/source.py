"""Backward direction, source side: the Source Transferability Map (BiSMAP Sec. 3.4, Eqs. 7 and 9).

For every source image x^s (GPA-stylized when the warmup was, i.e. as the
training loss sees it) and every pixel i at label resolution::

    D(x^s)_i = min_j || \\hat{f}_i^s - A_j ||_2                                  (Eq. 7)
    w_i^s    = min{ exp(-D(x^s)_i^2 / d_mean^2 * log 2) + e'_{y_i^s}, 1.0 }      (Eq. 9)

* \\hat{f}^s: :mod:`bismap.stm.embeddings`. ``distance_resolution: image``
  (default, BiSMAP footnote 1): the embedding map is bilinearly upsampled to
  the label size and Eq. 7 is evaluated at every pixel (exact search in
  chunks of ``chunk_rows`` pixels on the job's device,
  :class:`bismap.stm.clustering.PrototypeSearch`); ``embedding``: Eq. 7 at the
  embedding cells, then the distance map is bilinearly upsampled (cheaper by
  ~stride^2).
* d_mean: mean of D over every pixel of the WHOLE source set, from a separate
  pass (:func:`source_distance_statistics`, one job per shard) whose exact
  partial sums (:class:`bismap.stm.weights.MeanDistanceAccumulator`) are merged before
  any map is written: the maps depend neither on file order nor on sharding.
* e': Eq. 8 from :func:`bismap.stm.target.class_entropy`; y^s the
  ground truth; ignore pixels (255) get weight 0.0 (:mod:`bismap.stm.weights`).

Output: one 16-bit grayscale PNG per source image, ``<sample name>.png``, at
label resolution; weight = value / 65535 (read back by
:func:`bismap.stm.weights.read_weight_map`, imported here too). Images are processed
one at a time, so any shard count gives byte-identical PNGs. The training
stage finds them with :func:`weight_map_paths`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from bismap.progress import tqdm

from bismap.data.loading import Manifest
from bismap.data.photometric import load_statistics
from bismap.data.samples import IGNORE_INDEX
from bismap.io import atomic_path, read_json, shard_png_paths, write_json, write_png
from bismap.labels.strategies import shard_indices
from bismap.stm.clustering import PrototypeSearch
from bismap.stm.embeddings import EmbeddingNetwork, embedding_dataset, upsampled_rows
from bismap.stm.target import load_prototypes, read_class_entropy
from bismap.stm.weights import (CONTROL_FORMS, WEIGHT_PNG_SCALE, MeanDistanceAccumulator, control_weights,
                                encode_weight_png, read_weight_map)

logger = logging.getLogger(__name__)

RESOLUTIONS = ("image", "embedding")


@dataclass(frozen=True)
class TransferabilitySettings:
    distance_resolution: str = "image"  # "image": BiSMAP footnote 1; "embedding": distances upsampled
    chunk_rows: int = 65_536  # pixels per nearest-prototype search
    histogram_bins: int = 20  # per-class weight histogram over [0, 1] in the summary
    workers: int = 0
    form: str = "eq9"  # Eq. 9, or a control of it (bismap.stm.weights.control_weights)

    def __post_init__(self) -> None:
        if self.form not in CONTROL_FORMS:
            raise ValueError(f"form must be one of {CONTROL_FORMS}, got '{self.form}'")
        if self.distance_resolution not in RESOLUTIONS:
            raise ValueError(f"distance_resolution must be one of {RESOLUTIONS}, got '{self.distance_resolution}'")
        if self.chunk_rows < 1 or self.histogram_bins < 1:
            raise ValueError("chunk_rows and histogram_bins must be >= 1")


@torch.no_grad()
def image_distances(network: EmbeddingNetwork, image: torch.Tensor, search: PrototypeSearch,
                    settings: TransferabilitySettings) -> np.ndarray:
    """BiSMAP Eq. 7 for one image (3, H, W) -> D (H, W) float32 at image resolution; ``search`` holds {A_j}."""
    embeddings = network(image[None])[0].float()  # (E, h, w)
    size = tuple(image.shape[-2:])  # (H, W)
    if settings.distance_resolution == "embedding":
        cells = search.distances(embeddings.flatten(1).T)  # (h*w,)
        grid = torch.from_numpy(cells).view(1, 1, *embeddings.shape[-2:])  # (1, 1, h, w)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    parts = [search.distances(rows)  # (n,) per chunk of whole image rows
             for rows in upsampled_rows(embeddings, size, settings.chunk_rows)]
    return np.concatenate(parts).reshape(size)


def source_loader(manifest: Manifest, network: EmbeddingNetwork, shard_index: int, shard_count: int,
                  workers: int, photometric_statistics_path: str | Path | None) -> DataLoader:
    """Labelled source images of one shard (image i in shard i % shard_count), GPA-stylized if given."""
    photometric = load_statistics(photometric_statistics_path) if photometric_statistics_path else None
    dataset = embedding_dataset(manifest, network.normalization, labelled=True, photometric_statistics=photometric)
    indices = shard_indices(len(manifest.samples), shard_index, shard_count)
    return DataLoader(Subset(dataset, indices), batch_size=None, num_workers=workers)


def accumulator_state(accumulator: MeanDistanceAccumulator) -> dict[str, Any]:
    """JSON-able exact state: pixel count and the integer mantissa sum per binary exponent."""
    return {"count": accumulator.count,
            "mantissa_sums": {str(exponent): total for exponent, total in sorted(accumulator.mantissa_sums.items())}}


def accumulator_from_state(state: dict[str, Any]) -> MeanDistanceAccumulator:
    accumulator = MeanDistanceAccumulator()
    accumulator.count = int(state["count"])
    accumulator.mantissa_sums = {int(exponent): int(total) for exponent, total in state["mantissa_sums"].items()}
    return accumulator


def source_distance_statistics(network: EmbeddingNetwork, manifest_path: str | Path, prototypes_path: str | Path,
                               output_path: str | Path, shard_index: int, shard_count: int,
                               settings: TransferabilitySettings, device: torch.device,
                               photometric_statistics_path: str | Path | None = None) -> dict[str, Any]:
    """The d_mean pass (Eq. 9) over one shard: exact sum and count of D over all its pixels, JSON."""
    search = PrototypeSearch(load_prototypes(prototypes_path), device, chunk_rows=settings.chunk_rows)  # J x E
    manifest = Manifest.load(manifest_path)
    loader = source_loader(manifest, network, shard_index, shard_count, settings.workers, photometric_statistics_path)
    accumulator = MeanDistanceAccumulator()
    for item in tqdm(loader, desc=f"source distances {shard_index + 1}/{shard_count}", unit="img"):
        accumulator.add(image_distances(network, item["image"].to(device), search, settings))
    result = {"shard_index": shard_index, "shard_count": shard_count, "images": len(loader.dataset),
              "distance_sum": float(accumulator.total()), **accumulator_state(accumulator)}
    write_json(output_path, result)
    logger.info("shard %d/%d: %d pixels, mean D %.4f", shard_index + 1, shard_count, accumulator.count,
                result["distance_sum"] / max(accumulator.count, 1))
    return result


def mean_distance(statistics_paths: Sequence[str | Path]) -> tuple[float, int]:
    """d_mean of Eq. 9 over the whole source set from every shard's exact partial sums, and the pixel count."""
    states = [read_json(path) for path in statistics_paths]
    counts = {state["shard_count"] for state in states}
    indices = sorted(state["shard_index"] for state in states)
    if len(counts) != 1 or indices != list(range(counts.pop())):
        raise ValueError(f"distance statistics {list(statistics_paths)} are not one complete set of shards "
                         f"(indices {indices}, counts {sorted({s['shard_count'] for s in states})})")
    merged = MeanDistanceAccumulator()
    for state in states:
        merged.merge(accumulator_from_state(state))
    return merged.mean(), merged.count


class WeightStatistics:
    """Per-class pixel counts, exact sums of the uint16 weight codes and histograms over [0, 1] (bins)."""

    def __init__(self, num_classes: int, bins: int) -> None:
        self.num_classes, self.bins, self.images, self.ignore_pixels = num_classes, bins, 0, 0
        self.pixel_count = np.zeros(num_classes, dtype=np.int64)  # (C,)
        self.code_sum = np.zeros(num_classes, dtype=np.int64)  # (C,) exact: integers
        self.histogram = np.zeros((num_classes, bins), dtype=np.int64)  # (C, bins)

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        """codes (H, W) uint16 of one weight map, labels (H, W) ground truth (255 = ignore)."""
        valid = labels != IGNORE_INDEX  # (H, W)
        classes, values = labels[valid].astype(np.int64), codes[valid].astype(np.int64)  # (n,), (n,)
        bins = np.minimum(values * self.bins // WEIGHT_PNG_SCALE, self.bins - 1)  # (n,) bin of w = code / 65535
        self.images += 1
        self.ignore_pixels += int((~valid).sum())
        self.pixel_count += np.bincount(classes, minlength=self.num_classes)
        self.code_sum += np.bincount(classes, weights=values, minlength=self.num_classes).astype(np.int64)
        flat = np.bincount(classes * self.bins + bins, minlength=self.num_classes * self.bins)
        self.histogram += flat.reshape(self.num_classes, self.bins)

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "ignore_pixels": self.ignore_pixels, "bins": self.bins,
                "pixel_count": self.pixel_count.tolist(), "code_sum": self.code_sum.tolist(),
                "histogram": self.histogram.tolist()}


def write_weight_png(path: str | Path, codes: np.ndarray) -> None:
    """(H, W) uint16 codes -> 16-bit grayscale PNG, atomically."""
    if codes.dtype != np.uint16 or codes.ndim != 2:
        raise ValueError(f"weight codes must be (H, W) uint16, got {codes.dtype} {codes.shape}")
    with atomic_path(path) as temporary:
        Image.fromarray(codes).save(temporary, format="PNG")


def weight_map_paths(directories: Sequence[str | Path], expected_names: Sequence[str] | None = None
                     ) -> dict[str, Path]:
    """Sample name -> weight map PNG over all shard folders; a name in two folders, a missing folder or
    (with ``expected_names``) a source image without a map raises, naming them."""
    return shard_png_paths(directories, "weight map", expected_names)


@torch.no_grad()
def write_weight_maps(network: EmbeddingNetwork, manifest_path: str | Path, prototypes_path: str | Path,
                      class_entropy_path: str | Path, distance_paths: Sequence[str | Path], output_dir: str | Path,
                      shard_index: int, shard_count: int, settings: TransferabilitySettings, device: torch.device,
                      class_names: list[str], photometric_statistics_path: str | Path | None = None,
                      statistics_path: str | Path | None = None,
                      class_means: np.ndarray | None = None) -> dict[str, Any]:
    """Eq. 9 maps (or a control, ``settings.form``; class_mean needs the Eq. 9 ``class_means`` (C,)) of one
    shard's source images as ``<output_dir>/<name>.png``; returns (writes) statistics."""
    centroids = load_prototypes(prototypes_path)  # (J, E)
    search = PrototypeSearch(centroids, device, chunk_rows=settings.chunk_rows)
    d_mean, pixels = mean_distance(distance_paths)
    entropy = read_class_entropy(class_entropy_path, class_names)  # e' (C,)
    manifest = Manifest.load(manifest_path)
    loader = source_loader(manifest, network, shard_index, shard_count, settings.workers, photometric_statistics_path)
    statistics = WeightStatistics(len(class_names), settings.histogram_bins)
    logger.info("d_mean %.6f over %d source pixels; J = %d prototypes", d_mean, pixels, len(centroids))
    for item in tqdm(loader, desc=f"transferability {shard_index + 1}/{shard_count}", unit="img"):
        distances = image_distances(network, item["image"].to(device), search, settings)  # (H, W), Eq. 7
        labels = item["label"].numpy()  # (H, W)
        weights = control_weights(settings.form, distances, labels, d_mean, entropy, class_means)  # Eq. 9
        codes = encode_weight_png(weights)
        write_weight_png(Path(output_dir) / f"{manifest.samples[item['index']].name}.png", codes)
        statistics.add(codes, labels)
    result = {**statistics.as_dict(), "class_names": class_names, "d_mean": d_mean, "distance_pixels": pixels,
              "clusters": len(centroids), "shard_index": shard_index, "shard_count": shard_count, "form": settings.form}
    if statistics_path is not None:
        write_json(statistics_path, result)
    return result


def class_mean_weights(summary_path: str | Path, class_names: Sequence[str]) -> np.ndarray:
    """(C,) the mean Eq. 9 weight of each class over the source set (stm/summary.json); 1.0 for absent classes."""
    means = read_json(summary_path)["mean_transferability_per_class"]
    return np.array([1.0 if means.get(name) is None else means[name] for name in class_names], dtype=np.float64)


def summarize_weight_statistics(parts: Sequence[dict[str, Any] | str | Path]) -> dict[str, Any]:
    """Sum the shards' statistics into the STM summary: d_mean, per-class mean weight, histograms, counts."""
    loaded = [part if isinstance(part, dict) else read_json(part) for part in parts]
    first = loaded[0]
    for key in ("class_names", "d_mean", "clusters", "bins", "shard_count"):
        if any(part[key] != first[key] for part in loaded):
            raise ValueError(f"weight map statistics disagree on '{key}': {[part[key] for part in loaded]}")
    names = first["class_names"]
    counts = np.sum([part["pixel_count"] for part in loaded], axis=0, dtype=np.int64)  # (C,)
    codes = np.sum([part["code_sum"] for part in loaded], axis=0, dtype=np.int64)  # (C,)
    histogram = np.sum([part["histogram"] for part in loaded], axis=0, dtype=np.int64)  # (C, bins)
    means = [int(code) / (int(count) * WEIGHT_PNG_SCALE) if count else None for code, count in zip(codes, counts)]
    return {"class_names": names, "images": sum(part["images"] for part in loaded), "d_mean": first["d_mean"],
            "distance_pixels": first["distance_pixels"], "clusters": first["clusters"],
            "png_encoding": "16-bit grayscale PNG per source image, weight = value / 65535",
            "mean_transferability": int(codes.sum()) / (int(counts.sum()) * WEIGHT_PNG_SCALE) if counts.sum() else None,
            "mean_transferability_per_class": dict(zip(names, means)),
            "pixel_count_per_class": dict(zip(names, counts.tolist())),
            "ignore_pixels": sum(part["ignore_pixels"] for part in loaded),
            "histogram": {"bin_edges": np.linspace(0.0, 1.0, first["bins"] + 1).tolist(),
                          "counts_per_class": dict(zip(names, histogram.tolist()))}}


def _tile(array: np.ndarray, width: int, resample: Image.Resampling) -> np.ndarray:
    height = max(1, round(width * array.shape[0] / array.shape[1]))
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def write_preview(path: str | Path, manifest: Manifest, weight_paths: dict[str, Path], rows: int,
                  photometric_statistics_path: str | Path | None = None, tile_width: int = 192, gap: int = 4) -> None:
    """PNG, one row per source image (the first ``rows``): image as trained | weight map | map over the image.

    Weight maps use matplotlib's viridis (dark = 0, yellow = 1); the overlay is their 50/50 blend.
    """
    from matplotlib import colormaps

    from bismap.data.photometric import align_image
    from bismap.data.samples import open_image

    statistics = load_statistics(photometric_statistics_path) if photometric_statistics_path else None
    tiles = []
    for sample in manifest.samples[:rows]:
        image = open_image(sample.image)  # (H, W, 3) uint8
        image = align_image(image, statistics) if statistics is not None else image  # GPA, as trained
        heat = (colormaps["viridis"](read_weight_map(weight_paths[sample.name]))[..., :3] * 255).astype(np.uint8)
        blend = ((image.astype(np.uint16) + heat) // 2).astype(np.uint8)
        nearest = Image.Resampling.NEAREST
        tiles.append([_tile(image, tile_width, Image.Resampling.BILINEAR), _tile(heat, tile_width, nearest),
                      _tile(blend, tile_width, nearest)])
    height = max(row[0].shape[0] for row in tiles)
    canvas = np.full((len(tiles) * (height + gap) - gap, 3 * (tile_width + gap) - gap, 3), 255, np.uint8)
    for row, row_tiles in enumerate(tiles):
        for column, tile in enumerate(row_tiles):
            top, left = row * (height + gap), column * (tile_width + gap)
            canvas[top:top + tile.shape[0], left:left + tile_width] = tile
    write_png(path, canvas)


def merge_transferability(statistics_paths: Sequence[str | Path], weight_dirs: Sequence[str | Path],
                          manifest_path: str | Path, summary_path: str | Path, preview_path: str | Path,
                          preview_images: int, photometric_statistics_path: str | Path | None = None) -> dict[str, Any]:
    """Rule merge_source_transferability: every map present once, the summary JSON and the preview PNG."""
    manifest = Manifest.load(manifest_path)
    paths = weight_map_paths(weight_dirs, [sample.name for sample in manifest.samples])
    summary = {**summarize_weight_statistics(statistics_paths), "weight_dirs": [str(d) for d in weight_dirs]}
    write_preview(preview_path, manifest, paths, preview_images, photometric_statistics_path)
    write_json(summary_path, summary)
    logger.info("STM: %d maps, d_mean %.4f, mean weight %.4f; per class %s", len(paths), summary["d_mean"],
                summary["mean_transferability"] or 0.0,
                {name: None if value is None else round(value, 3)
                 for name, value in summary["mean_transferability_per_class"].items()})
    return summary
