"""Evaluate a checkpoint on a labelled domain: per-class IoU, mIoU, confusion matrix."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from bismap.progress import tqdm

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.evaluation.metrics import confusion_matrix, markdown_table, plot_confusion, summarize
from bismap.io import write_json, write_text
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateSettings:
    batch_size: int = 1
    workers: int = 0
    evaluated_classes: tuple[int, ...] | None = None  # e.g. SYNTHIA's 16 or 13 of the 19 classes
    class_subsets: dict[str, list[int]] | None = None  # more mIoUs from the same confusion: SYNTHIA's mIoU-13


@dataclass(frozen=True)
class EvaluationPaths:
    metrics_json: Path
    metrics_markdown: Path
    confusion_png: Path


@torch.no_grad()
def predict_confusion(model: torch.nn.Module, manifest: Manifest, settings: EvaluateSettings,
                      device: torch.device, num_classes: int) -> np.ndarray:
    """Accumulate the (K, K) confusion matrix of full-resolution predictions."""
    dataset = SegmentationDataset(manifest, augmentation=None, labelled=True)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers)
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in tqdm(loader, desc="evaluate", unit="batch"):
        images = batch["image"].to(device)  # (B, 3, H, W)
        labels = batch["label"].to(device)  # (B, H, W)
        logits = model(images).logits  # (B, K, H/4, W/4)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    return confusion.numpy()


def evaluate_checkpoint(checkpoint_path: str | Path, manifest_path: str | Path, paths: EvaluationPaths,
                        settings: EvaluateSettings, device: torch.device, title: str) -> dict:
    model, checkpoint = load_model(checkpoint_path, device)
    class_names = checkpoint["class_names"]
    manifest = Manifest.load(manifest_path)
    confusion = predict_confusion(model, manifest, settings, device, len(class_names))
    evaluated = list(settings.evaluated_classes) if settings.evaluated_classes else None
    metrics = summarize(confusion, class_names, evaluated, settings.class_subsets)
    metrics.update(checkpoint=str(checkpoint_path), dataset=str(manifest_path), images=len(manifest.samples),
                   confusion=confusion.tolist(), provenance=checkpoint.get("provenance"))
    logger.info("%s: mIoU %.2f over %d images", title, metrics["miou"], len(manifest.samples))
    shown = [class_names[index] for index in metrics["evaluated_classes"]]
    write_text(paths.metrics_markdown, markdown_table({title: metrics}, shown))
    plot_confusion(confusion, class_names, paths.confusion_png, f"{title}: mIoU {metrics['miou']:.1f}")
    write_json(paths.metrics_json, metrics)
    return metrics
