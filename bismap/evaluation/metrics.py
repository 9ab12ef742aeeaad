"""Confusion matrices, per-class IoU and mIoU, and their Markdown/PNG renderings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bismap.data.samples import IGNORE_INDEX
from bismap.io import atomic_path

if TYPE_CHECKING:  # the report rules read metrics without torch: its import costs ~2 s a job
    import torch


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    import torch

    valid = target != IGNORE_INDEX
    codes = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def intersection_over_union(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def summarize(confusion: np.ndarray, class_names: list[str], evaluated_classes: list[int] | None = None,
              class_subsets: dict[str, list[int]] | None = None) -> dict:
    """Per-class IoU (percent), mIoU over the evaluated classes present, pixel accuracy, and the mIoU of each
    named subset of classes (``subset_miou``; SYNTHIA's mIoU-13 beside its mIoU-16), all from ``confusion``."""
    confusion = np.asarray(confusion)
    iou = intersection_over_union(confusion) * 100.0
    classes = list(range(len(class_names))) if evaluated_classes is None else list(evaluated_classes)
    present = [index for index in classes if not np.isnan(iou[index])]
    total = confusion.sum()
    return {
        "miou": float(np.mean(iou[present])) if present else float("nan"),
        "pixel_accuracy": float(np.trace(confusion) / total * 100.0) if total else float("nan"),
        "per_class_iou": {class_names[index]: _finite_or_none(iou[index]) for index in classes},
        "evaluated_classes": classes,
        "pixels": int(total),
        "subset_miou": {name: _mean_present(iou, subset) for name, subset in (class_subsets or {}).items()},
    }


def _mean_present(iou: np.ndarray, classes: list[int]) -> float:
    present = [index for index in classes if not np.isnan(iou[index])]
    return float(np.mean(iou[present])) if present else float("nan")


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def markdown_table(rows: dict[str, dict], class_names: list[str]) -> str:
    """One row per model: per-class IoU then mIoU, the layout of UDA papers' tables."""
    subsets = list(next(iter(rows.values()), {}).get("subset_miou", {}))  # e.g. mIoU-13 after SYNTHIA's mIoU-16
    header = "| model | " + " | ".join(class_names) + " | mIoU |" + "".join(f" {name} |" for name in subsets)
    lines = [header, "|" + "---|" * (len(class_names) + 2 + len(subsets))]
    for model_name, metrics in rows.items():
        cells = [_format(metrics["per_class_iou"].get(name)) for name in class_names]
        extra = "".join(f" {_format(metrics['subset_miou'][name])} |" for name in subsets)
        lines.append(f"| {model_name} | " + " | ".join(cells) + f" | {_format(metrics['miou'])} |" + extra)
    return "\n".join(lines) + "\n"


def _format(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.1f}"


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG (recall on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(class_names)), class_names, rotation=90)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("prediction")
    axis.set_ylabel("ground truth")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
