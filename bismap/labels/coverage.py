"""Label sets of equal coverage: the threshold that makes a strategy label a given share of target pixels.

A control of BiSMAP's MAPs labels (issue: each component isolated): self-training
on the warmup's confidence labels, or on CAG-UDA's anchor labels, thresholded to
label the same share of target-train pixels as the MAPs labels, so a difference
in the trained model comes from which pixels are labelled and how, not from how
many. The share is the MAPs labels' PL ratio (no target label is read); the
threshold is the (1 - share) quantile of the strategy's score over the shard's
pixels (softmax maximum for ``confidence``, d_second - d_nearest for ``cas``),
scored exactly as the labelling pass scores them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bismap.labels.gmm import torch_dtype
from bismap.labels.strategies import (LabellingShard, PseudoLabelSettings, assign_cas, assign_confidence,
                                      network_outputs, open_labelling_shard, outputs_at_image_size)
from bismap.progress import tqdm

logger = logging.getLogger(__name__)

SCORES_PER_IMAGE = 4096  # a strided sample of each image's scores bounds the memory on full-size images


def pixel_scores(logits: torch.Tensor, features: torch.Tensor, settings: PseudoLabelSettings,
                 centroids: torch.Tensor | None) -> torch.Tensor:
    """(K, h, w) logits, (D, h, w) features -> (h*w,) the score the strategy thresholds."""
    if settings.strategy == "cas":
        rows = features.flatten(1).T  # (h*w, D)
        return assign_cas(rows, centroids, 0.0, torch_dtype(settings.score_dtype), settings.chunk_rows)[1]
    return assign_confidence(logits.flatten(1).T, 0.0)[1]


def coverage_threshold(scores: np.ndarray, coverage: float) -> float:
    """The threshold that keeps the share ``coverage`` of ``scores`` (its 1 - coverage quantile)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - coverage))


@torch.no_grad()
def match_coverage(checkpoint_path: str | Path, manifest_path: str | Path, prototypes_path: str | Path | None,
                   settings: PseudoLabelSettings, coverage: float, shard_index: int, shard_count: int,
                   device: torch.device) -> PseudoLabelSettings:
    """``settings`` with the confidence (or margin) that labels the share ``coverage`` of the shard's pixels."""
    shard = open_labelling_shard(checkpoint_path, manifest_path, prototypes_path, settings, shard_index, shard_count,
                                 device)
    return shard_coverage_settings(shard, settings, coverage, device)


@torch.no_grad()
def shard_coverage_settings(shard: LabellingShard, settings: PseudoLabelSettings, coverage: float,
                            device: torch.device) -> PseudoLabelSettings:
    """``settings`` with the threshold that labels the share ``coverage`` of ``shard``'s pixels with its model."""
    centroids = shard.prototypes.centroids if shard.prototypes else None
    sampled = []
    loader = DataLoader(shard.dataset, batch_size=None, num_workers=settings.workers, generator=torch.Generator())
    for item in tqdm(loader, desc="coverage scores", unit="img"):
        image = item["image"][None].to(device)  # (1, 3, H, W)
        logits, features = network_outputs(shard.model, image, settings)  # (K, h, w), (D, h, w)
        if settings.resolution == "image":
            logits, features = outputs_at_image_size(logits, features, tuple(image.shape[-2:]))
        scores = pixel_scores(logits, features, settings, centroids)
        sampled.append(scores[:: max(1, scores.numel() // SCORES_PER_IMAGE)].double().cpu())
    threshold = coverage_threshold(torch.cat(sampled).numpy(), coverage)
    logger.info("%s labels at coverage %.3f: threshold %.5g", settings.strategy, coverage, threshold)
    key = "margin" if settings.strategy == "cas" else "confidence"
    return dataclasses.replace(settings, match_coverage=False, **{key: threshold})
