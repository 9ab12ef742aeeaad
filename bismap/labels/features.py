"""Source features of correctly classified pixels, sampled per class into HDF5 (BiSMAP Eq. 3).

BiSMAP fits its per-class GMMs (the MAPs, Sec. 3.3) on the decoder features
of the *source* pixels that the warmup model classifies correctly::

    Lambda_c = { f_i^s | argmax G(x^s)_i = c, y_i^s = c }            (Eq. 3)

and samples up to 300,000 of them per class ("features_per_class").

Resolution. Features and logits come at feature resolution (h, w) =
(H/4, W/4); the label is brought to that grid by nearest-neighbour sampling at
the centre of every cell: feature cell (i, j) takes the label of image pixel
``(floor((i + 0.5) * H / h), floor((j + 0.5) * W / w))``. When H and W are
multiples of 4 this is pixel (4i + 2, 4j + 2), i.e. ``label[..., 2::4, 2::4]``.

Sampling. Every pixel gets a random priority key drawn from a generator seeded
with ``(seed, image index)`` for the whole (h, w) grid of its image; per class
the ``features_per_class`` candidates with the smallest keys are kept
(reservoir sampling by priority). The sample is uniform over all correct
pixels of the whole source set, and it depends on the seed alone, not on the
batch size or the order of the batches. Rows are stored by increasing key, so
any prefix of a class's rows is itself a uniform sample.

Output (HDF5, written atomically): dataset ``class_<id>`` float32 (n_c, D) per
class (shape (0, D) when the class has no correct pixel), datasets
``feature_mean`` / ``feature_std`` (D,) over all kept rows (used to
standardise before fitting GMMs), and file attributes ``feature_dim``,
``class_names`` (JSON), ``pixels_labelled_per_class``,
``pixels_seen_per_class`` (correct pixels, |Lambda_c|),
``pixels_kept_per_class``, ``checkpoint_sha256``, ``manifest``, ``images``,
``settings`` (JSON).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from bismap.progress import tqdm

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.data.photometric import load_statistics
from bismap.data.samples import IGNORE_INDEX, DatasetError
from bismap.io import atomic_path
from bismap.settings import to_dict
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSettings:
    features_per_class: int = 300_000  # BiSMAP Sec. 3.3
    batch_size: int = 1  # images of different sizes need 1
    workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.features_per_class < 1 or self.batch_size < 1:
            raise ValueError(f"features.features_per_class and batch_size must be >= 1, got "
                             f"{self.features_per_class} and {self.batch_size}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cell_centre_indices(size: int, cells: int) -> torch.Tensor:
    """Index of the pixel at the centre of each of ``cells`` cells covering ``size`` pixels: (cells,)."""
    positions = (torch.arange(cells, dtype=torch.float64) + 0.5) * size / cells
    return positions.floor().long().clamp_(max=size - 1)


def downsample_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w): the label at the centre pixel of every feature cell."""
    rows = cell_centre_indices(label.shape[-2], size[0]).to(label.device)  # (h,)
    columns = cell_centre_indices(label.shape[-1], size[1]).to(label.device)  # (w,)
    return label[..., rows[:, None], columns[None, :]]


def priority_keys(seed: int, image_index: int, pixels: int) -> torch.Tensor:
    """Random keys (pixels,) float64 for one image; they depend on (seed, image index) only."""
    return torch.from_numpy(np.random.default_rng([seed, image_index]).random(pixels))


class ClassReservoir:
    """The ``capacity`` rows with the smallest keys among everything offered (per class)."""

    def __init__(self, capacity: int, feature_dim: int) -> None:
        self.capacity, self.feature_dim = capacity, feature_dim
        self.keys = torch.empty(0, dtype=torch.float64)  # (n,)
        self.features = torch.empty(0, feature_dim)  # (n, D)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending_rows = 0
        self.threshold = float("inf")  # the largest kept key once full: larger keys cannot enter
        self.seen = 0

    def offer(self, keys: torch.Tensor, features: torch.Tensor) -> None:
        """keys (n,) float64, features (n, D) (any device); keeps what may still enter."""
        self.seen += int(keys.numel())
        entering = keys < self.threshold
        if not bool(entering.any()):
            return
        self.pending.append((keys[entering].cpu(), features[entering].float().cpu()))
        self.pending_rows += int(entering.sum())
        if self.pending_rows > max(self.capacity // 2, 4096):
            self.compact()

    def compact(self) -> None:
        keys = torch.cat([self.keys, *(key for key, _ in self.pending)])  # (n,)
        features = torch.cat([self.features, *(feature for _, feature in self.pending)])  # (n, D)
        self.pending, self.pending_rows = [], 0
        order = torch.argsort(keys, stable=True)[: self.capacity]
        self.keys, self.features = keys[order], features[order]
        if self.keys.numel() == self.capacity:
            self.threshold = float(self.keys[-1])

    def result(self) -> torch.Tensor:
        """The kept rows (n_c, D) float32, by increasing key."""
        self.compact()
        return self.features


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise DatasetError(f"images of different sizes {sorted(shapes)} in one batch (indices "
                           f"{[item['index'] for item in items]}): use batch_size 1")
    return {"image": torch.stack([item["image"] for item in items]),
            "label": torch.stack([item["label"] for item in items]),
            "index": [int(item["index"]) for item in items]}


@torch.no_grad()
def _offer_batch(model: torch.nn.Module, batch: dict[str, Any], reservoirs: list[ClassReservoir],
                 labelled: np.ndarray, seed: int, device: torch.device) -> None:
    """Run one batch and offer its correctly classified pixels (Eq. 3) to the class reservoirs."""
    output = model(batch["image"].to(device))
    features = output.features  # (B, D, h, w)
    size = tuple(features.shape[-2:])
    labels = downsample_label(batch["label"].to(device), size).flatten()  # (B*h*w,)
    predictions = output.logits.argmax(dim=1).flatten()  # (B*h*w,)
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (B*h*w, D)
    keys = torch.cat([priority_keys(seed, index, size[0] * size[1]) for index in batch["index"]]).to(device)
    valid = labels != IGNORE_INDEX
    labelled += np.bincount(labels[valid].cpu().numpy(), minlength=len(reservoirs))[: len(reservoirs)]
    correct = valid & (predictions == labels)  # Eq. 3: argmax G(x)_i = c and y_i = c
    for class_id in torch.unique(labels[correct]).tolist():
        chosen = correct & (labels == class_id)
        reservoirs[class_id].offer(keys[chosen], rows[chosen])


def write_features(path: str | Path, rows_per_class: list[torch.Tensor], class_names: list[str],
                   seen_per_class: list[int], attributes: dict[str, Any] | None = None) -> None:
    """Write a features file (layout in the module docstring) atomically; rows (n_c, D) per class."""
    feature_dim = int(rows_per_class[0].shape[1])
    pooled = torch.cat(rows_per_class).double()  # (sum n_c, D)
    mean = pooled.mean(0) if len(pooled) else torch.zeros(feature_dim, dtype=torch.float64)  # (D,)
    std = pooled.std(0, correction=0) if len(pooled) else torch.ones(feature_dim, dtype=torch.float64)  # (D,)
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
        for class_id, rows in enumerate(rows_per_class):
            handle.create_dataset(f"class_{class_id}", data=rows.cpu().numpy().astype(np.float32))
        handle.create_dataset("feature_mean", data=mean.numpy())
        handle.create_dataset("feature_std", data=std.numpy())
        handle.attrs.update(attributes or {})
        handle.attrs.update(feature_dim=feature_dim, class_names=json.dumps(list(class_names)),
                            pixels_seen_per_class=np.asarray(seen_per_class, dtype=np.int64),
                            pixels_kept_per_class=np.array([len(rows) for rows in rows_per_class], dtype=np.int64))


def extract_source_features(checkpoint_path: str | Path, manifest_path: str | Path, output_path: str | Path,
                            settings: FeatureSettings, device: torch.device,
                            photometric_statistics_path: str | Path | None = None) -> dict[str, Any]:
    """Sample the features of correctly classified source pixels per class (Eq. 3) into HDF5.

    ``photometric_statistics_path``: stylize the source images by GPA (BiSMAP
    Sec. 3.5) as the warmup model saw them. Returns the summary (also the attributes).
    """
    model, checkpoint = load_model(checkpoint_path, device)
    model.eval()
    class_names = list(checkpoint["class_names"])
    manifest = Manifest.load(manifest_path)
    photometric = load_statistics(photometric_statistics_path) if photometric_statistics_path else None
    dataset = SegmentationDataset(manifest, labelled=True, photometric_statistics=photometric)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers, collate_fn=_collate)
    feature_dim = int(model.classifier.in_channels)
    reservoirs = [ClassReservoir(settings.features_per_class, feature_dim) for _ in class_names]
    labelled = np.zeros(len(class_names), dtype=np.int64)
    for batch in tqdm(loader, desc="source features", unit="batch"):
        _offer_batch(model, batch, reservoirs, labelled, settings.seed, device)
    attributes = {"pixels_labelled_per_class": labelled, "checkpoint_sha256": file_sha256(checkpoint_path),
                  "manifest": str(manifest_path), "images": len(manifest.samples),
                  "settings": json.dumps(to_dict(settings))}
    kept_rows = [reservoir.result() for reservoir in reservoirs]
    seen = [reservoir.seen for reservoir in reservoirs]
    write_features(output_path, kept_rows, class_names, seen, attributes)
    kept = [len(rows) for rows in kept_rows]
    summary = {**attributes, "feature_dim": feature_dim, "class_names": class_names, "settings": to_dict(settings),
               "pixels_labelled_per_class": labelled.tolist(), "pixels_seen_per_class": seen,
               "pixels_kept_per_class": kept}
    logger.info("kept %d source features (%s per class) in %s", sum(kept), kept, output_path)
    return summary


@dataclass(frozen=True)
class FeatureFileInfo:
    class_names: tuple[str, ...]
    feature_dim: int
    pixels_seen_per_class: tuple[int, ...]
    pixels_kept_per_class: tuple[int, ...]
    feature_mean: np.ndarray  # (D,) float64
    feature_std: np.ndarray  # (D,) float64


def read_feature_info(path: str | Path) -> FeatureFileInfo:
    """The metadata of a features file; a file that is not one raises ValueError naming it."""
    with h5py.File(path, "r") as handle:
        missing = [key for key in ("class_names", "feature_dim", "pixels_kept_per_class") if key not in handle.attrs]
        if missing or "feature_mean" not in handle:
            raise ValueError(f"{path} is not a bismap features file: missing {missing or ['feature_mean']}")
        return FeatureFileInfo(tuple(json.loads(handle.attrs["class_names"])), int(handle.attrs["feature_dim"]),
                               tuple(int(v) for v in handle.attrs["pixels_seen_per_class"]),
                               tuple(int(v) for v in handle.attrs["pixels_kept_per_class"]),
                               handle["feature_mean"][()], handle["feature_std"][()])


def read_class_features(path: str | Path, class_id: int, max_rows: int | None = None) -> np.ndarray:
    """The first ``max_rows`` (a uniform sample) or all rows of one class: (n, D) float32."""
    with h5py.File(path, "r") as handle:
        key = f"class_{class_id}"
        if key not in handle:
            raise KeyError(f"{path} has no dataset '{key}' (classes: {len(json.loads(handle.attrs['class_names']))})")
        dataset = handle[key]
        return dataset[: dataset.shape[0] if max_rows is None else max_rows]
