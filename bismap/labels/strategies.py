"""Target pseudo-labels (uint8 PNGs, 255 = ignore) by four strategies (BiSMAP Table 3, 5).

* ``maps``: BiSMAP's MAPs-PLA. Class = argmax_c log p_c(f) (Eq. 4), kept when
  max_c log p_c(f) >= delta (Eq. 6). ``threshold_mode='absolute'`` uses one
  delta for all classes (the paper: 100 for GTA5, -50 for SYNTHIA);
  ``'percentile'`` uses per class the ``percentile``-th percentile of that
  class's own source log-densities (stored in the prototypes by
  :func:`bismap.labels.gmm.merge_class_gmms`), because an absolute delta depends on
  the feature scale and dimension.
* ``cas``: CAG-UDA's category anchors. Class = the nearest source class
  centroid (Euclidean, CAG-UDA Eq. 5); kept ("active") when the second-nearest
  distance minus the nearest exceeds ``margin`` (Delta_d, CAG-UDA Eq. 6).
* ``confidence``: argmax of the softmax, kept when its maximum >= ``confidence``.
* ``confidence_balanced``: argmax of the softmax; per image and per predicted
  class the ceil(``fraction`` * n_c) most confident pixels are kept (ties: the
  earlier pixel in row-major order).

By default (``resolution='feature'``) everything is scored at feature
resolution (h, w) = (H/4, W/4), in chunks of ``chunk_rows`` rows of the
(h*w, D) features; the (h, w) label map, with the decision already applied, is
then upsampled to the image size by nearest neighbour (image pixel (y, x) takes
cell (floor(y*h/H), floor(x*w/W))). ``resolution='image'`` upsamples logits
and features bilinearly to (H, W) first and scores every image pixel.
Images are run one at a time, so a label never depends on which other images
share its shard: any shard count gives byte-identical PNGs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from bismap.progress import tqdm

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.data.samples import IGNORE_INDEX
from bismap.io import read_json, write_json, write_png
from bismap.labels.gmm import ClassPrototypes, torch_dtype
from bismap.methods.prototypes import margin_assignment
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)

STRATEGIES = ("maps", "cas", "confidence", "confidence_balanced")
THRESHOLD_MODES = ("absolute", "percentile")
RESOLUTIONS = ("feature", "image")


@dataclass(frozen=True)
class PseudoLabelSettings:
    strategy: str = "maps"  # one of STRATEGIES
    threshold_mode: str = "absolute"  # maps: 'absolute' (delta) or 'percentile'
    delta: float = 100.0  # maps, absolute: BiSMAP Eq. 6 (100 GTA5, -50 SYNTHIA)
    percentile: float = 20.0  # maps, percentile: of each class's own source log-densities (0-100)
    classifier_agreement: bool = False  # maps: keep a label only where the classifier's argmax agrees (not Eq. 6)
    margin: float = 1.0  # cas: CAG-UDA Delta_d (BiSMAP Table 5: 0.5-2)
    confidence: float = 0.9  # confidence: minimum softmax maximum
    fraction: float = 0.5  # confidence_balanced: share kept per predicted class and image
    flip_average: bool = False  # confidence strategies: average the softmax of x and of its mirror (ProDA)
    # confidence strategies: average the softmax over the image resized by each factor (the public BiSMAP
    # inference.py labels its distillation targets at 0.75, 1 and 1.5)
    scales: tuple[float, ...] = (1.0,)
    # confidence, cas: the threshold (confidence or margin) that labels the same share of pixels as a reference
    # label set, found by bismap.labels.coverage.match_coverage before labelling
    match_coverage: bool = False
    # 'feature': label the (h, w) network outputs, then upsample the labels by nearest neighbour (each
    # label covers a stride x stride block); 'image': upsample logits and features bilinearly to (H, W)
    # first, as the evaluation does with logits, so a label follows structures thinner than the stride.
    resolution: str = "feature"
    score_dtype: str = "float32"  # of the GMM and distance scoring
    chunk_rows: int = 65_536
    workers: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"pseudo_labels.strategy must be one of {STRATEGIES}, got '{self.strategy}'")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"pseudo_labels.threshold_mode must be one of {THRESHOLD_MODES}, "
                             f"got '{self.threshold_mode}'")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"pseudo_labels.resolution must be one of {RESOLUTIONS}, got '{self.resolution}'")
        if self.classifier_agreement and self.strategy != "maps":
            raise ValueError(f"pseudo_labels.classifier_agreement needs strategy maps, not '{self.strategy}'")
        if self.flip_average and not self.strategy.startswith("confidence"):
            raise ValueError(f"pseudo_labels.flip_average needs a confidence strategy, not '{self.strategy}'")
        if tuple(self.scales) != (1.0,) and not self.strategy.startswith("confidence"):
            raise ValueError(f"pseudo_labels.scales needs a confidence strategy, not '{self.strategy}'")
        if not self.scales or any(scale <= 0 for scale in self.scales):
            raise ValueError(f"pseudo_labels.scales must be positive factors, got {list(self.scales)}")
        if self.match_coverage and self.strategy not in ("confidence", "cas"):
            raise ValueError(f"pseudo_labels.match_coverage needs strategy confidence or cas, not '{self.strategy}'")
        if not 0.0 <= self.fraction <= 1.0 or not 0.0 <= self.percentile <= 100.0:
            raise ValueError("pseudo_labels.fraction must be in [0, 1] and percentile in [0, 100]")


def _keep(labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(kept, labels, torch.full_like(labels, IGNORE_INDEX))


def assign_maps(features: torch.Tensor, prototypes: ClassPrototypes, thresholds: torch.Tensor,
                dtype: torch.dtype = torch.float32, chunk_rows: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """BiSMAP Eq. 6: (N, D) features -> labels (N,) (255 where max_c log p_c < delta_c) and max log p (N,)."""
    labels, scores = [], []
    for chunk in features.split(chunk_rows):
        score, label = prototypes.log_densities(chunk, dtype, chunk_rows).max(dim=1)  # (n,), (n,)
        kept = torch.isfinite(score) & (score >= thresholds.to(score)[label])
        labels.append(_keep(label, kept))
        scores.append(score)
    return torch.cat(labels), torch.cat(scores)


def assign_cas(features: torch.Tensor, centroids: torch.Tensor, margin: float,
               dtype: torch.dtype = torch.float32, chunk_rows: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """CAG-UDA Eq. 5-7: nearest anchor, active when d_second - d_nearest > margin; returns labels, margins."""
    centroids = centroids.to(device=features.device, dtype=dtype)  # (C, D), NaN rows: absent classes
    absent = torch.isnan(centroids).any(dim=1)  # (C,)
    labels, scores = [], []
    for chunk in features.split(chunk_rows):
        distances = torch.cdist(chunk.to(dtype), centroids.nan_to_num(0.0))  # (n, C)
        distances[:, absent] = torch.inf
        label, gap = margin_assignment(distances, margin, dim=1)  # (n,), (n,): shared with bismap.methods.cag
        labels.append(label)
        scores.append(gap)
    return torch.cat(labels), torch.cat(scores)


def assign_confidence(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) logits -> labels (N,) kept where the softmax maximum >= threshold, and that maximum."""
    confidence, labels = logits.float().softmax(dim=1).max(dim=1)  # (N,), (N,)
    return _keep(labels, confidence >= threshold), confidence


def assign_confidence_balanced(logits: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted class keep the ceil(fraction * n_c) most confident of its n_c pixels: (N, K) -> (N,)."""
    confidence, labels = logits.float().softmax(dim=1).max(dim=1)  # (N,), (N,)
    kept = torch.zeros_like(labels, dtype=torch.bool)
    for class_id in torch.unique(labels).tolist():
        members = torch.nonzero(labels == class_id).squeeze(1)  # (n_c,) ascending pixel index
        count = math.ceil(round(fraction * len(members), 6))
        order = torch.argsort(confidence[members], descending=True, stable=True)
        kept[members[order[:count]]] = True
    return _keep(labels, kept), confidence


def resolve_thresholds(settings: PseudoLabelSettings, prototypes: ClassPrototypes) -> torch.Tensor:
    """delta per class (C,) float64: the absolute delta, or the calibrated percentiles."""
    if settings.threshold_mode == "percentile":
        thresholds = torch.from_numpy(prototypes.percentile_thresholds(settings.percentile))
    else:
        thresholds = torch.full((len(prototypes.class_names),), settings.delta, dtype=torch.float64)
    logger.info("MAPs thresholds (%s): %s", settings.threshold_mode,
                {name: round(float(value), 2) for name, value in zip(prototypes.class_names, thresholds)})
    return thresholds


def label_map(logits: torch.Tensor, features: torch.Tensor, settings: PseudoLabelSettings,
              prototypes: ClassPrototypes | None, thresholds: torch.Tensor | None) -> torch.Tensor:
    """One image's (K, h, w) logits and (D, h, w) features -> (h, w) int64 labels, 255 = ignore."""
    size = tuple(logits.shape[-2:])
    rows = features.flatten(1).T  # (h*w, D), a view
    dtype, chunk = torch_dtype(settings.score_dtype), settings.chunk_rows
    if settings.strategy == "maps":
        labels, _ = assign_maps(rows, prototypes, thresholds, dtype, chunk)
        if settings.classifier_agreement:  # the density and the classifier must name the same class
            labels = _keep(labels, labels == logits.flatten(1).argmax(dim=0))
    elif settings.strategy == "cas":
        labels, _ = assign_cas(rows, prototypes.centroids, settings.margin, dtype, chunk)
    elif settings.strategy == "confidence":
        labels, _ = assign_confidence(logits.flatten(1).T, settings.confidence)
    else:
        labels, _ = assign_confidence_balanced(logits.flatten(1).T, settings.fraction)
    return labels.view(size)


def averaged_logits(model: torch.nn.Module, image: torch.Tensor, logits: torch.Tensor, flip_average: bool,
                    scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """log of the mean softmax of (1, 3, H, W) ``image`` resized by each of ``scales`` (and of each one's mirror,
    mirrored back, with ``flip_average``), each at ``logits``' (h, w): (1, K, h, w). ``logits``: the image's own,
    at scale 1. Without mirrors or other scales, ``logits`` itself."""
    if not flip_average and tuple(scales) == (1.0,):
        return logits
    size = tuple(logits.shape[-2:])
    probabilities = []
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear",
                                                          align_corners=False)  # (1, 3, sH, sW)
        views = [logits if scale == 1.0 else model(scaled).logits]  # (1, K, sh, sw)
        if flip_average:
            views.append(model(scaled.flip(-1)).logits.flip(-1))
        probabilities += [(view if tuple(view.shape[-2:]) == size else F.interpolate(
            view, size=size, mode="bilinear", align_corners=False)).softmax(dim=1) for view in views]
    return torch.stack(probabilities).mean(dim=0).log()  # (1, K, h, w)


def network_outputs(model: torch.nn.Module, image: torch.Tensor, settings: PseudoLabelSettings
                    ) -> tuple[torch.Tensor, ...]:
    """One (1, 3, H, W) image -> its (K, h, w) logits (averaged over mirrors and scales as the settings ask) and
    (D, h, w) decoder features (of the image itself)."""
    output = model(image)
    logits = averaged_logits(model, image, output.logits, settings.flip_average, settings.scales)
    return logits[0], output.features[0]


def upsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) labels -> (H, W) uint8 by nearest neighbour."""
    upsampled = F.interpolate(labels[None, None].float(), size=size, mode="nearest")  # (1, 1, H, W)
    return upsampled[0, 0].to(torch.uint8)


def outputs_at_image_size(logits: torch.Tensor, features: torch.Tensor,
                          size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, h, w) logits and (D, h, w) features bilinearly to (K, H, W), (D, H, W): resolution 'image'
    (BiSMAP footnote 1); memory grows with H x W x D."""
    logits, features = (F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]
                        for tensor in (logits, features))
    return logits, features


def image_labels(logits: torch.Tensor, features: torch.Tensor, size: tuple[int, int], settings: PseudoLabelSettings,
                 prototypes: ClassPrototypes | None, thresholds: torch.Tensor | None) -> np.ndarray:
    """The scoring stage of one image: (K, h, w) logits, (D, h, w) features -> (H, W) uint8 labels, 255 = ignore."""
    if settings.resolution == "image":
        logits, features = outputs_at_image_size(logits, features, size)
    labels = label_map(logits, features, settings, prototypes, thresholds)  # (h, w), or (H, W)
    return upsample_labels(labels, size).cpu().numpy()


class LabelStatistics:
    """Pixel counts at image resolution: pseudo-labelled, and correct where ground truth exists."""

    def __init__(self, class_names: Sequence[str]) -> None:
        classes = len(class_names)
        self.class_names = list(class_names)
        self.images, self.total_pixels = 0, 0
        self.labelled = np.zeros(classes, dtype=np.int64)  # pseudo-labelled pixels per class
        self.with_ground_truth = np.zeros(classes, dtype=np.int64)  # ... of them with a valid true label
        self.correct = np.zeros(classes, dtype=np.int64)

    def add(self, labels: np.ndarray, truth: np.ndarray | None) -> None:
        classes = len(self.class_names)
        self.images += 1
        self.total_pixels += labels.size
        assigned = labels != IGNORE_INDEX
        self.labelled += np.bincount(labels[assigned], minlength=classes)[:classes]
        if truth is not None:
            checked = assigned & (truth != IGNORE_INDEX)
            self.with_ground_truth += np.bincount(labels[checked], minlength=classes)[:classes]
            self.correct += np.bincount(labels[checked & (labels == truth)], minlength=classes)[:classes]

    def as_dict(self, has_ground_truth: bool) -> dict[str, Any]:
        result = {"class_names": self.class_names, "images": self.images, "total_pixels": self.total_pixels,
                  "labelled_per_class": self.labelled.tolist()}
        if has_ground_truth:
            result.update(with_ground_truth_per_class=self.with_ground_truth.tolist(),
                          correct_per_class=self.correct.tolist())
        return summarize_label_statistics(result)


def summarize_label_statistics(counts: dict[str, Any]) -> dict[str, Any]:
    """Add the PL ratio (BiSMAP Table 5) and per-class precision to summed counts."""
    labelled = sum(counts["labelled_per_class"])
    summary = {**counts, "pl_ratio": labelled / counts["total_pixels"] if counts["total_pixels"] else 0.0}
    if "correct_per_class" in counts:
        summary["precision_per_class"] = [correct / checked if checked else None for correct, checked
                                          in zip(counts["correct_per_class"], counts["with_ground_truth_per_class"])]
        checked = sum(counts["with_ground_truth_per_class"])
        summary["precision"] = sum(counts["correct_per_class"]) / checked if checked else None
    return summary


def merge_label_statistics(parts: Sequence[dict[str, Any] | str | Path]) -> dict[str, Any]:
    """Sum the statistics of all shards (dicts or their JSON files)."""
    loaded = [part if isinstance(part, dict) else read_json(part) for part in parts]
    keys = [key for key in ("labelled_per_class", "with_ground_truth_per_class", "correct_per_class")
            if all(key in part for part in loaded)]
    counts = {"class_names": loaded[0]["class_names"], "images": sum(part["images"] for part in loaded),
              "total_pixels": sum(part["total_pixels"] for part in loaded)}
    counts.update({key: np.sum([part[key] for part in loaded], axis=0).tolist() for key in keys})
    return summarize_label_statistics(counts)


def load_matching_prototypes(path: str | Path, class_names: list[str], device: torch.device) -> ClassPrototypes:
    """The MAPs file, refused when it was fitted for other classes than the checkpoint predicts."""
    prototypes = ClassPrototypes.load(path, device)
    if list(prototypes.class_names) != class_names:
        raise ValueError(f"prototypes {path} are for classes {list(prototypes.class_names)}, "
                         f"the checkpoint for {class_names}")
    return prototypes


def strategy_prototypes(path: str | Path | None, settings: PseudoLabelSettings, class_names: list[str],
                     device: torch.device) -> ClassPrototypes | None:
    if settings.strategy not in ("maps", "cas"):
        return None
    if path is None:
        raise ValueError(f"pseudo-label strategy '{settings.strategy}' needs a prototypes file")
    prototypes = load_matching_prototypes(path, class_names, device)
    if settings.strategy == "cas" and prototypes.centroids is None:
        raise ValueError(f"prototypes {path} carry no class centroids, which strategy 'cas' needs")
    return prototypes


def shard_indices(count: int, shard_index: int, shard_count: int) -> list[int]:
    """Images i with i % shard_count == shard_index, in manifest order."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count}: need 0 <= shard_index < shard_count")
    return list(range(shard_index, count, shard_count))


@dataclass(frozen=True)
class LabellingShard:
    """What a pass over one shard of target images needs: the model in eval mode, its class names, the
    strategy's prototypes, the manifest and the shard's images."""

    model: torch.nn.Module
    class_names: list[str]
    prototypes: ClassPrototypes | None
    manifest: Manifest
    dataset: Dataset  # items with their 'index' into the manifest's samples
    labelled: bool  # the items carry their true labels (for statistics only)


def open_labelling_shard(checkpoint_path: str | Path, manifest_path: str | Path, prototypes_path: str | Path | None,
                         settings: PseudoLabelSettings, shard_index: int, shard_count: int, device: torch.device,
                         with_truth: bool = False) -> LabellingShard:
    """Load the model and prototypes and select the shard's images; ``with_truth``: with their labels where every
    image of the manifest has one."""
    model, checkpoint = load_model(checkpoint_path, device)
    class_names = list(checkpoint["class_names"])
    prototypes = strategy_prototypes(prototypes_path, settings, class_names, device)
    manifest = Manifest.load(manifest_path)
    labelled = with_truth and all(sample.label is not None for sample in manifest.samples)
    dataset = Subset(SegmentationDataset(manifest, labelled=labelled),
                     shard_indices(len(manifest.samples), shard_index, shard_count))
    return LabellingShard(model.eval(), class_names, prototypes, manifest, dataset, labelled)


@torch.no_grad()
def label_shard(shard: LabellingShard, settings: PseudoLabelSettings, output_dir: str | Path, device: torch.device,
                description: str) -> dict[str, Any]:
    """Write ``<output_dir>/<sample name>.png`` for the shard's images with ``shard.model``; return its statistics."""
    thresholds = resolve_thresholds(settings, shard.prototypes) if settings.strategy == "maps" else None
    # its own generator: labelling draws nothing from the global RNG (a training run labels mid-run)
    loader = DataLoader(shard.dataset, batch_size=None, num_workers=settings.workers, generator=torch.Generator())
    statistics = LabelStatistics(shard.class_names)
    for item in tqdm(loader, desc=description, unit="img"):
        image = item["image"][None].to(device)  # one image at a time: shard-independent results
        logits, features = network_outputs(shard.model, image, settings)  # (K, h, w), (D, h, w)
        labels = image_labels(logits, features, tuple(image.shape[-2:]), settings, shard.prototypes,
                              thresholds)  # (H, W)
        write_png(Path(output_dir) / f"{shard.manifest.samples[item['index']].name}.png", labels)
        statistics.add(labels, item["label"].numpy() if shard.labelled else None)
    return statistics.as_dict(shard.labelled)


def label_images(checkpoint_path: str | Path, manifest_path: str | Path, prototypes_path: str | Path | None,
                 output_dir: str | Path, shard_index: int, shard_count: int, settings: PseudoLabelSettings,
                 device: torch.device, statistics_path: str | Path | None = None) -> dict[str, Any]:
    """Write ``<output_dir>/<sample name>.png`` for the shard's images; return (and write) its statistics."""
    if settings.match_coverage:
        raise ValueError("pseudo-label settings with match_coverage need their threshold first "
                         "(bismap.labels.coverage.match_coverage)")
    shard = open_labelling_shard(checkpoint_path, manifest_path, prototypes_path, settings, shard_index, shard_count,
                                 device, with_truth=True)
    result = label_shard(shard, settings, output_dir, device, f"pseudo-labels {shard_index + 1}/{shard_count}")
    result.update(strategy=settings.strategy, shard_index=shard_index, shard_count=shard_count)
    if statistics_path is not None:
        write_json(statistics_path, result)
    logger.info("shard %d/%d: %d images, PL ratio %.3f", shard_index + 1, shard_count, len(shard.dataset),
                result["pl_ratio"])
    return result
