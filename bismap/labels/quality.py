"""Pseudo-label quality against target-train labels over threshold sweeps (BiSMAP Table 5).

For every strategy of :mod:`bismap.labels.strategies` (``maps``, ``cas``,
``confidence``, ``confidence_balanced``) and every threshold of its sweep the
report gives

* **coverage**: the labelled fraction of all target-train pixels (the "PL
  ratio" of BiSMAP Table 5);
* **accuracy**: correct / labelled, over the labelled pixels that have a true
  label (the ``precision`` of :class:`bismap.labels.strategies.LabelStatistics`);
* **mIoU**: the mean IoU of the pseudo-labels against the truth over the
  labelled pixels only (an unlabelled pixel is neither right nor wrong), over
  the classes that occur there;
* per class: **accuracy** (precision of the pixels given class c) and, in the
  JSON, the IoU and the share of the true class-c pixels that got any label;

plus, at common labelled fractions (``coverage_levels``), each strategy's
accuracy and mIoU interpolated linearly along its sweep: the "at about the same
ratio of pseudo labels" comparison of BiSMAP Sec. 4.5.

Efficiency: every image goes through the network once; every strategy scores
it once at feature resolution (h, w) (or, with ``resolution='image'``, on
logits and features bilinearly upsampled to the image, as the labels that
training reads) with the functions of
:mod:`bismap.labels.strategies` (the per-cell class and score: max log-density,
anchor-distance gap, softmax maximum, or within-class rank), and every
threshold of the sweep is then a comparison on those cached (h*w,) scores.
Labels are counted at image resolution without upsampling per threshold: the
true-class histogram of the image pixels each cell covers under the nearest
upsampling of :func:`bismap.labels.strategies.upsample_labels` is computed once per
image, so the numbers are exactly those of the PNGs that
:func:`bismap.labels.strategies.label_images` would write at that threshold (same
dtype, same comparison: ``>=`` for maps and confidence, ``>`` for cas).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from bismap.progress import tqdm

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.data.samples import IGNORE_INDEX
from bismap.evaluation.metrics import intersection_over_union
from bismap.io import atomic_path, write_json, write_text
from bismap.labels.gmm import ClassPrototypes, torch_dtype
from bismap.labels.strategies import (RESOLUTIONS, STRATEGIES, THRESHOLD_MODES, assign_cas, assign_confidence,
                                      assign_maps, load_matching_prototypes, outputs_at_image_size)
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategySweep:
    thresholds: tuple[float, ...]
    threshold_mode: str = "absolute"  # maps only: deltas ('absolute') or per-class percentiles ('percentile')

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise ValueError("a strategy sweep needs at least one threshold")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got '{self.threshold_mode}'")


@dataclass(frozen=True)
class Strategies:
    maps: StrategySweep | None = None
    cas: StrategySweep | None = None
    confidence: StrategySweep | None = None
    confidence_balanced: StrategySweep | None = None

    def items(self) -> list[tuple[str, StrategySweep]]:
        """The configured sweeps, in the order of ``STRATEGIES``."""
        return [(name, getattr(self, name)) for name in STRATEGIES if getattr(self, name) is not None]


@dataclass(frozen=True)
class ReportSettings:
    strategies: Strategies = field(default_factory=Strategies)
    coverage_levels: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    score_dtype: str = "float32"  # of the GMM and distance scoring, as PseudoLabelSettings.score_dtype
    chunk_rows: int = 65_536
    workers: int = 0
    # 'image': score every image pixel on bilinearly upsampled logits and features, as the pseudo_labels rule
    # with resolution 'image' (BiSMAP footnote 1); 'feature': score the (h, w) cells
    resolution: str = "feature"

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"pseudo_label_report.resolution must be one of {RESOLUTIONS}, got '{self.resolution}'")
        if not self.strategies.items():
            raise ValueError("pseudo_label_report.strategies names no strategy")
        if self.strategies.maps and self.strategies.maps.threshold_mode == "percentile":
            if not all(0.0 <= value <= 100.0 for value in self.strategies.maps.thresholds):
                raise ValueError("maps percentile thresholds must lie in [0, 100]")
        if self.strategies.confidence_balanced:
            if not all(0.0 <= value <= 1.0 for value in self.strategies.confidence_balanced.thresholds):
                raise ValueError("confidence_balanced thresholds (fractions) must lie in [0, 1]")


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    json: Path
    plot: Path


def cell_truth_counts(label: torch.Tensor, cells: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(H, W) truth -> (h*w, C+1) int64: per feature cell, its image pixels of each true class.

    Column C counts ignore (255) pixels. The cell of a pixel is the one nearest
    upsampling (``F.interpolate(mode='nearest')``, as in ``upsample_labels``) gives it.
    """
    height, width = cells
    index = torch.arange(height * width, dtype=torch.float32, device=label.device).view(1, 1, height, width)
    cell_of_pixel = F.interpolate(index, size=tuple(label.shape[-2:]), mode="nearest")[0, 0].long()  # (H, W)
    truth = label.long().clone()
    truth[(truth < 0) | (truth >= num_classes)] = num_classes  # ignore -> column C
    codes = (cell_of_pixel * (num_classes + 1) + truth).flatten()
    return torch.bincount(codes, minlength=height * width * (num_classes + 1)).view(height * width, num_classes + 1)


def within_class_ranks(labels: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Rank (0 = most confident) of each pixel among the pixels of its predicted class: (N,) int64.

    Ties: the earlier pixel first, as :func:`bismap.labels.strategies.assign_confidence_balanced`.
    """
    by_confidence = torch.argsort(confidence, descending=True, stable=True)  # (N,)
    order = by_confidence[torch.argsort(labels[by_confidence], stable=True)]  # grouped by class
    grouped = labels[order]
    starts = torch.searchsorted(grouped, grouped, right=False)  # first position of each pixel's class
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=order.device) - starts
    return ranks


class SweepCounts:
    """Per threshold, the (C pred, C+1 true) counts of labelled image pixels (true column C = ignore)."""

    def __init__(self, thresholds: tuple[float, ...], num_classes: int) -> None:
        self.thresholds = thresholds
        self.counts = torch.zeros(len(thresholds), num_classes, num_classes + 1, dtype=torch.float64)

    def add(self, labels: torch.Tensor, kept: torch.Tensor, truth_counts: torch.Tensor) -> None:
        """labels (N,), kept (T, N) bool, truth_counts (N, C+1) of one image."""
        weights = truth_counts.to(torch.float64)
        for index, mask in enumerate(kept):
            part = torch.zeros(self.counts.shape[1:], dtype=torch.float64, device=weights.device)
            part.index_add_(0, labels[mask], weights[mask])
            self.counts[index] += part.cpu()


def _score_strategies(logits: torch.Tensor, features: torch.Tensor, settings: ReportSettings,
                      prototypes: ClassPrototypes | None,
                      percentile_thresholds: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per strategy: labels (N,) and kept (T, N) for every threshold of its sweep, from one scoring."""
    rows = features.flatten(1).T  # (h*w, D)
    dtype, chunk = torch_dtype(settings.score_dtype), settings.chunk_rows
    num_classes = logits.shape[0]
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, sweep in settings.strategies.items():
        if name == "maps":
            floor = torch.full((num_classes,), -torch.inf, dtype=torch.float64)
            labels, scores = assign_maps(rows, prototypes, floor, dtype, chunk)  # 255 where no finite density
            valid = labels != IGNORE_INDEX
            safe = labels.clamp(max=num_classes - 1)
            per_class_thresholds = percentile_thresholds if sweep.threshold_mode == "percentile" else [
                torch.full((num_classes,), float(value), dtype=torch.float64) for value in sweep.thresholds]
            # the comparison of assign_maps: delta cast to the score dtype, >=
            kept = torch.stack([valid & (scores >= deltas.to(scores)[safe]) for deltas in per_class_thresholds])
        elif name == "cas":
            labels, gaps = assign_cas(rows, prototypes.centroids, -math.inf, dtype, chunk)
            valid = labels != IGNORE_INDEX
            kept = torch.stack([valid & (gaps > float(value)) for value in sweep.thresholds])
        elif name == "confidence":
            labels, confidence = assign_confidence(logits.flatten(1).T, 0.0)
            kept = torch.stack([confidence >= float(value) for value in sweep.thresholds])
        else:  # confidence_balanced
            confidence, labels = logits.flatten(1).T.float().softmax(dim=1).max(dim=1)
            ranks = within_class_ranks(labels, confidence)
            members = torch.bincount(labels, minlength=num_classes).tolist()  # pixels per predicted class
            kept = torch.stack([ranks < torch.tensor([math.ceil(round(float(value) * count, 6)) for count in members],
                                                     device=labels.device)[labels]
                                for value in sweep.thresholds])
        result[name] = (labels.clamp(max=num_classes - 1), kept)
    return result


def _rows(counts: torch.Tensor, thresholds: tuple[float, ...], total_pixels: int,
          truth_per_class: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    classes = len(class_names)
    for threshold, matrix in zip(thresholds, counts.numpy()):
        labelled_per_class = matrix.sum(axis=1)  # (C,) by pseudo class, ignore-truth pixels included
        confusion = matrix[:, :classes].T  # (C true, C pred), pixels with a true label
        checked = confusion.sum(axis=0)  # (C,) per pseudo class
        correct = np.diag(confusion)
        iou = intersection_over_union(confusion)
        present = ~np.isnan(iou)
        rows.append({
            "threshold": float(threshold),
            "coverage": float(labelled_per_class.sum() / total_pixels) if total_pixels else 0.0,
            "accuracy": float(correct.sum() / checked.sum()) if checked.sum() else None,
            "miou": float(iou[present].mean()) if present.any() else None,
            "labelled_per_class": labelled_per_class.astype(np.int64).tolist(),
            "correct_per_class": correct.astype(np.int64).tolist(),
            "accuracy_per_class": [float(c / n) if n else None for c, n in zip(correct, checked)],
            "iou_per_class": [None if np.isnan(value) else float(value) for value in iou],
            "coverage_per_class": [float(n / t) if t else None
                                   for n, t in zip(confusion.sum(axis=1), truth_per_class)],
        })
    return rows


def equal_coverage(strategies: dict[str, dict[str, Any]], levels: tuple[float, ...]) -> dict[str, Any]:
    """Accuracy and mIoU of each strategy interpolated at common coverages (None outside its sweep)."""
    result: dict[str, Any] = {"coverage_levels": list(levels), "accuracy": {}, "miou": {}}
    for name, entry in strategies.items():
        for metric in ("accuracy", "miou"):
            points = sorted((row["coverage"], row[metric]) for row in entry["rows"] if row[metric] is not None)
            values = []
            for level in levels:
                inside = points and points[0][0] - 1e-12 <= level <= points[-1][0] + 1e-12
                values.append(float(np.interp(level, *zip(*points))) if inside else None)
            result[metric][name] = values
    return result


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def markdown_report(report: dict[str, Any]) -> str:
    names = report["class_names"]
    lines = [f"# Pseudo-label quality on target-train ({report['images']} images, "
             f"{report['total_pixels']} pixels)", "",
             "Coverage = labelled share of all pixels (PL ratio, BiSMAP Table 5); accuracy = correct / labelled; "
             "mIoU over the labelled pixels; per-class columns: accuracy of the pixels given that class. "
             "All in percent.", "",
             "| strategy | threshold | coverage | accuracy | mIoU | " + " | ".join(names) + " |",
             "|" + "---|" * (5 + len(names))]
    for name, entry in report["strategies"].items():
        mode = " (percentile)" if entry.get("threshold_mode") == "percentile" else ""
        for row in entry["rows"]:
            cells = [_percent(value) for value in row["accuracy_per_class"]]
            lines.append(f"| {name}{mode} | {row['threshold']:g} | {_percent(row['coverage'])} | "
                         f"{_percent(row['accuracy'])} | {_percent(row['miou'])} | " + " | ".join(cells) + " |")
    compared = report["equal_coverage"]
    strategies = list(report["strategies"])
    lines += ["", "## At equal coverage (linear interpolation along each sweep; - = outside its range)", "",
              "| coverage | " + " | ".join(f"{name} accuracy" for name in strategies) + " | "
              + " | ".join(f"{name} mIoU" for name in strategies) + " |",
              "|" + "---|" * (1 + 2 * len(strategies))]
    for index, level in enumerate(compared["coverage_levels"]):
        cells = [_percent(compared[metric][name][index]) for metric in ("accuracy", "miou") for name in strategies]
        lines.append(f"| {_percent(level)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy and mIoU against coverage, one line per strategy, thresholds annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, metric, title in zip(axes, ("accuracy", "miou"), ("accuracy of labelled pixels", "mIoU of labelled pixels")):
        for name, entry in report["strategies"].items():
            points = [(row["coverage"] * 100, row[metric] * 100, row["threshold"]) for row in entry["rows"]
                      if row[metric] is not None]
            if not points:
                continue
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            for x, y, threshold in points:
                axis.annotate(f"{threshold:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        axis.set_xlabel("coverage: labelled pixels (%)")
        axis.set_ylabel(f"{metric} (%)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def pseudo_label_report(checkpoint_path: str | Path, manifest_path: str | Path, prototypes_path: str | Path | None,
                        paths: ReportPaths, settings: ReportSettings, device: torch.device) -> dict[str, Any]:
    """Score every target-train image once per strategy, sweep the thresholds, write Markdown, JSON and PNG."""
    model, checkpoint = load_model(checkpoint_path, device)
    model.eval()
    class_names = list(checkpoint["class_names"])
    prototypes, percentile_thresholds = _load_prototypes(prototypes_path, settings, class_names, device)
    manifest = Manifest.load(manifest_path)
    counts, truth_per_class, total_pixels = _accumulate(model, manifest, settings, prototypes,
                                                        percentile_thresholds, len(class_names), device)
    report: dict[str, Any] = {"class_names": class_names, "images": len(manifest.samples),
                              "total_pixels": total_pixels, "checkpoint": str(checkpoint_path),
                              "manifest": str(manifest_path), "strategies": {}}
    for name, sweep in settings.strategies.items():
        entry: dict[str, Any] = {"rows": _rows(counts[name].counts, sweep.thresholds, total_pixels,
                                               truth_per_class[:len(class_names)], class_names)}
        if name == "maps":
            entry["threshold_mode"] = sweep.threshold_mode
            if percentile_thresholds is not None:
                for row, values in zip(entry["rows"], percentile_thresholds):
                    row["delta_per_class"] = [float(v) if math.isfinite(v) else None for v in values.cpu().tolist()]
        report["strategies"][name] = entry
    report["equal_coverage"] = equal_coverage(report["strategies"], settings.coverage_levels)
    write_text(paths.markdown, markdown_report(report))
    plot_report(report, paths.plot)
    write_json(paths.json, report)
    for name, entry in report["strategies"].items():
        logger.info("%s: %s", name, ", ".join(f"t={row['threshold']:g} cov {_percent(row['coverage'])} "
                                                 f"acc {_percent(row['accuracy'])} mIoU {_percent(row['miou'])}"
                                                 for row in entry["rows"]))
    return report


def _load_prototypes(prototypes_path: str | Path | None, settings: ReportSettings, class_names: list[str],
                     device: torch.device) -> tuple[ClassPrototypes | None, list[torch.Tensor] | None]:
    """The MAPs file when maps or cas is swept, and the per-class thresholds of a percentile sweep."""
    if not any(name in ("maps", "cas") for name, _ in settings.strategies.items()):
        return None, None
    if prototypes_path is None:
        raise ValueError("strategies maps and cas need a prototypes file")
    prototypes = load_matching_prototypes(prototypes_path, class_names, device)
    maps = settings.strategies.maps
    if maps is None or maps.threshold_mode != "percentile":
        return prototypes, None
    return prototypes, [torch.from_numpy(prototypes.percentile_thresholds(value)).to(device)
                        for value in maps.thresholds]


@torch.no_grad()
def _accumulate(model: torch.nn.Module, manifest: Manifest, settings: ReportSettings,
                prototypes: ClassPrototypes | None, percentile_thresholds: list[torch.Tensor] | None,
                classes: int, device: torch.device) -> tuple[dict[str, SweepCounts], np.ndarray, int]:
    """One pass over target-train: every strategy's sweep counts, truth pixels per class, all pixels."""
    dataset = SegmentationDataset(manifest, labelled=True)  # the report needs every label: fails naming one missing
    loader = DataLoader(dataset, batch_size=None, num_workers=settings.workers)
    counts = {name: SweepCounts(sweep.thresholds, classes) for name, sweep in settings.strategies.items()}
    truth_per_class = np.zeros(classes + 1, dtype=np.int64)
    total_pixels = 0
    for item in tqdm(loader, desc="pseudo-label report", unit="img"):
        output = model(item["image"][None].to(device))  # one image at a time, as label_images
        logits, features = output.logits[0], output.features[0]  # (K, h, w), (D, h, w)
        if settings.resolution == "image":  # one cell per image pixel, as the labels of the pseudo_labels rule
            logits, features = outputs_at_image_size(logits, features, tuple(item["label"].shape[-2:]))
        truth = cell_truth_counts(item["label"].to(device), tuple(logits.shape[-2:]), classes)  # (h*w, C+1)
        truth_per_class += truth.sum(dim=0).cpu().numpy()
        total_pixels += item["label"].numel()
        for name, (labels, kept) in _score_strategies(logits, features, settings, prototypes,
                                                      percentile_thresholds).items():
            counts[name].add(labels, kept, truth)
    return counts, truth_per_class, total_pixels
