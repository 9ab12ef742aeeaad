"""One pass of the warmup over target-train: class sums of its features under its own argmax labels.

ProDA initialises its prototypes with them (the centroids) and CPSL its
self-labelling head (Eq. 7, centroids of the L2-normalised features) and its
class distribution (Eq. 10, the pixel counts).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.methods.prototypes import class_feature_sums


@torch.no_grad()
def own_label_class_sums(model: torch.nn.Module, manifest_path: Path, num_classes: int, device: torch.device,
                         normalize: bool = False, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature sums (K, D) and pixel counts (K,) per predicted class, at feature resolution, over every image.

    ``normalize``: sum the L2-normalised features (CPSL's cosine head) instead of the raw ones.
    """
    dataset = SegmentationDataset(Manifest.load(manifest_path), labelled=False)
    model.eval()
    sums, counts = None, None
    for batch in DataLoader(dataset, batch_size=batch_size):
        output = model(batch["image"].to(device))
        features = F.normalize(output.features, dim=1) if normalize else output.features  # (B, D, h, w)
        batch_sums, batch_counts = class_feature_sums(features, output.logits.argmax(dim=1), num_classes)
        sums = batch_sums if sums is None else sums + batch_sums
        counts = batch_counts if counts is None else counts + batch_counts
    return sums, counts
