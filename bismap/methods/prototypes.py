"""Class prototypes shared by ProDA, CPSL, bi-directional contrastive learning and CAG-UDA.

All four papers keep one vector per class in the decoder's feature space and
compare pixel features with it:

* class centroids (masked average pooling) of the features of the pixels of a
  class: ProDA Eq. 5, CPSL Eq. 7, bi-directional contrastive Eq. 1, CAG-UDA
  Eq. 4 (category anchors). :func:`class_feature_sums` returns the sums and
  counts so that a centroid over a whole dataset (or over the processes of a
  multi-process batch) is a sum of parts; :func:`soft_class_feature_sums` does
  the same under soft assignments;
* the momentum update of ProDA Eq. 6 and bi-directional contrastive Eq. 4-5,
  only for the classes present in the batch (:func:`momentum_update`);
* Euclidean distances (ProDA Eq. 4 and 8, CAG-UDA Eq. 5) and cosine
  similarities (bi-directional contrastive Eq. 2-3 and 8-9) of every pixel to
  every prototype, (B, K, h, w);
* the nearest prototype with a distance margin (CAG-UDA Eq. 6-7), which the
  ``cas`` strategy of :mod:`bismap.labels.strategies` calls too;
* labelled pixels per class (:func:`class_pixel_counts`): CPSL's class
  distribution (Eq. 8, 10) and the running distributions of
  :mod:`bismap.methods.alignment`.

Conventions: prototypes are (K, D); a class without a prototype (never seen)
is a row of NaN, as in ``bismap.labels.gmm.ClassPrototypes.centroids``. Its distance
is +inf and its similarity -inf, so it never wins an argmin/argmax and gets a
softmax weight of 0. Labels are int64 with 255 (``IGNORE_INDEX``) = ignore, at
the feature resolution (h, w) (see :func:`labels_at_feature_size`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from bismap.data.samples import IGNORE_INDEX


def absent_classes(prototypes: torch.Tensor) -> torch.Tensor:
    """(K, D) prototypes -> (K,) bool, True for the classes without a prototype (NaN rows)."""
    return torch.isnan(prototypes).any(dim=1)


def labels_at_feature_size(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w) by nearest neighbour (no class is invented between two others)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")  # (B, 1, h, w)
    return resized[:, 0].long()


def class_pixel_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labelled pixels per class (K,), float64, of labels of any shape (255 = ignore)."""
    labelled = labels[labels != IGNORE_INDEX]
    return torch.bincount(labelled.reshape(-1), minlength=num_classes)[:num_classes].double()


def _pixel_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D), pixels in (b, y, x) order."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the features of each class's pixels (K, D) and the pixel counts (K,); 255 pixels are left out.

    features (B, D, h, w), labels (B, h, w) at the same resolution. The
    numerator and denominator of ProDA Eq. 5 / CPSL Eq. 7 / CAG-UDA Eq. 4, kept
    apart so that they add up over batches, shards and processes.
    """
    if labels.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match features {tuple(features.shape)}")
    flat_labels = labels.reshape(-1)
    labelled = flat_labels != IGNORE_INDEX
    kept_labels = flat_labels[labelled]
    if kept_labels.numel() and int(kept_labels.max()) >= num_classes:
        raise ValueError(f"label {int(kept_labels.max())} out of range for {num_classes} classes")
    rows = _pixel_rows(features)[labelled]  # (n, D)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, kept_labels, rows)
    counts = torch.bincount(kept_labels, minlength=num_classes).to(features.dtype)  # (K,)
    return sums, counts


def soft_class_feature_sums(features: torch.Tensor, assignments: torch.Tensor,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums under soft assignments: sum_i a_ik f_i (K, D) and sum_i a_ik (K,).

    features (B, D, h, w), assignments (B, K, h, w) (e.g. softmax probabilities),
    mask (B, h, w) of the pixels that count, or None for all of them.
    """
    weights = assignments if mask is None else assignments * mask[:, None].to(assignments.dtype)
    sums = torch.einsum("bkhw,bdhw->kd", weights, features)  # (K, D)
    return sums, weights.sum(dim=(0, 2, 3))


def centroids_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(K, D) sums / (K,) counts; NaN rows for classes with no pixel (no prototype, by convention)."""
    present = counts > 0
    centroids = sums / counts.clamp_min(torch.finfo(sums.dtype).tiny)[:, None]
    return torch.where(present[:, None], centroids, torch.full_like(centroids, torch.nan))


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Masked average pooling (K, D), NaN for absent classes: ProDA Eq. 5, contrastive Eq. 1, CAG-UDA Eq. 4."""
    return centroids_from_sums(*class_feature_sums(features, labels, num_classes))


def momentum_update(prototypes: torch.Tensor, batch_prototypes: torch.Tensor, momentum: float) -> torch.Tensor:
    """p <- m p + (1 - m) p_batch for the classes present in the batch (ProDA Eq. 6; contrastive Eq. 4-5).

    prototypes, batch_prototypes (K, D), NaN rows where a class has no value.
    A class absent from the batch keeps its prototype; a class seen for the
    first time takes the batch centroid (m p is undefined for it). No
    gradient flows into the result: prototypes are running statistics.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"prototype momentum must be in [0, 1], got {momentum}")
    batch_prototypes = batch_prototypes.detach().to(prototypes.dtype)
    present = ~absent_classes(batch_prototypes)[:, None]  # (K, 1)
    unseen = absent_classes(prototypes)[:, None]
    blended = momentum * prototypes.detach() + (1.0 - momentum) * batch_prototypes
    updated = torch.where(unseen, batch_prototypes, blended)
    return torch.where(present, updated, prototypes.detach())


def pixel_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every pixel to every prototype: (B, D, h, w), (K, D) -> (B, K, h, w), +inf if absent."""
    batch, _, height, width = features.shape
    prototypes = prototypes.to(features.dtype)
    distances = torch.cdist(_pixel_rows(features), prototypes.nan_to_num(0.0))  # (B*h*w, K)
    distances = distances.masked_fill(absent_classes(prototypes)[None], torch.inf)
    return distances.view(batch, height, width, -1).permute(0, 3, 1, 2)


def pixel_cosine_similarities(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity s(f, rho_k) of every pixel to every prototype (B, K, h, w); -inf where absent."""
    prototypes = prototypes.to(features.dtype)
    unit_features = F.normalize(features, dim=1)  # (B, D, h, w)
    unit_prototypes = F.normalize(prototypes.nan_to_num(0.0), dim=1)  # (K, D)
    similarities = torch.einsum("bdhw,kd->bkhw", unit_features, unit_prototypes)
    return similarities.masked_fill(absent_classes(prototypes)[None, :, None, None], -torch.inf)


def margin_assignment(distances: torch.Tensor, margin: float, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest prototype, kept when the second-nearest is farther by more than ``margin`` (CAG-UDA Eq. 6-7).

    distances: any shape with the classes along ``dim`` (+inf for absent
    classes). Returns labels (255 where not kept) and the gap
    d_second - d_nearest, both with ``dim`` removed. The comparison is strict
    (Eq. 6: ``>``), so a pixel equally far from two prototypes is never kept.
    With one class the gap is +inf.
    """
    nearest = distances.topk(min(2, distances.shape[dim]), dim=dim, largest=False)  # ascending
    first = nearest.values.select(dim, 0)
    if distances.shape[dim] > 1:
        gap = nearest.values.select(dim, 1) - first
    else:
        gap = torch.full_like(first, torch.inf)
    kept = torch.isfinite(first) & (gap > margin)
    labels = torch.where(kept, nearest.indices.select(dim, 0), torch.full_like(nearest.indices.select(dim, 0),
                                                                                IGNORE_INDEX))
    return labels, gap
