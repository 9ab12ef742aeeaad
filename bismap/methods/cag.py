"""CAG-UDA (paper 004): category anchor-guided adaptation.

What the paper defines (Sec. 3.2-3.4, 4.1) and what this module computes:

* Eq. 4 (CAC): category anchors f^s_c, the centroids of the source features
  of each class over the whole source set, computed at the start of a stage
  and then fixed (:func:`category_anchors` for one batch; over a dataset, add
  up ``bismap.methods.prototypes.class_feature_sums`` and divide with
  ``centroids_from_sums``). ``bismap.labels.gmm`` stores the same centroids with the
  MAPs (``ClassPrototypes.centroids``) for the ``cas`` pseudo-label strategy;
* Eq. 5-7 (ATI, PLA): the Euclidean distance of each target feature to each
  anchor; a pixel is active when the second-nearest anchor is farther than
  the nearest by more than Delta_d, and then takes the nearest anchor's class
  (:func:`anchor_pseudo_labels`). This is the computation of the ``cas``
  strategy of :mod:`bismap.labels.strategies` (both call
  ``bismap.methods.prototypes.margin_assignment``), here on a (B, D, h, w) map;
* Eq. 8 and 10: the category-wise distance loss ||f^s_c - f||^2 of source
  pixels (ground truth) and of active target pixels (their anchor label)
  (:func:`anchor_distance_pixels`);
* Eq. 9 and 11: cross-entropy on the active target pixels, by anchors and by
  predicted probability >= P0 (``bismap.losses.weighted_cross_entropy_pixels``
  on the labels of :func:`anchor_pseudo_labels` / :func:`probability_pseudo_labels`);
* Sec. 3.4, Algorithm 1: the stagewise schedule (:class:`CagSchedule`).

No public code of CAG-UDA was consulted; everything follows the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.labels.strategies import assign_confidence
from bismap.losses import PixelLosses
from bismap.methods.prototypes import absent_classes, class_centroids, margin_assignment, pixel_distances


@dataclass(frozen=True)
class CagSettings:
    """CAG-UDA's GTA5 -> Cityscapes setting (Sec. 4.1)."""

    margin: float = 2.5  # Delta_d of Eq. 6-7
    distance_weight: float = 0.3  # lambda_1 of Eq. 12, on L^s_dis + L^t_dis
    cross_entropy_weight: float = 0.7  # lambda_2 of Eq. 12, on L^t_CE + L^tP_CE
    probability_threshold: float = 0.95  # P_0 of the probability-based labels of Eq. 11

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"cag.margin must be >= 0, got {self.margin}")
        if not 0.0 <= self.probability_threshold <= 1.0:
            raise ValueError(f"cag.probability_threshold must be in [0, 1], got {self.probability_threshold}")


@dataclass(frozen=True)
class CagStage:
    """One stage of Algorithm 1: at its start (lines 4-6) the anchors (Eq. 4) are computed with the
    previous stage's model and the active states and labels (Eq. 5-7) fixed; then ``iterations`` of Eq. 12."""

    index: int  # 1-based, k of Algorithm 1
    first_iteration: int  # global iteration at which the stage starts
    iterations: int


@dataclass(frozen=True)
class CagSchedule:
    """Sec. 3.4: K stages of L iterations each, anchors and labels renewed between stages.

    ``stages`` = 3: Table 4 reports stage 3 as the final model, and a fourth
    stage brought nothing. ``iterations_per_stage`` has no default: the paper
    says only "20 epochs" (Sec. 4.1), per stage or in all, and of which set.
    """

    iterations_per_stage: int
    stages: int = 3

    def __post_init__(self) -> None:
        if self.stages < 1 or self.iterations_per_stage < 1:
            raise ValueError("cag schedule: stages and iterations_per_stage must be >= 1")

    def stage_list(self) -> tuple[CagStage, ...]:
        length = self.iterations_per_stage
        return tuple(CagStage(index, (index - 1) * length, length) for index in range(1, self.stages + 1))

    def stage_at(self, iteration: int) -> CagStage:
        """The stage that global ``iteration`` (0-based) belongs to."""
        if not 0 <= iteration < self.stages * self.iterations_per_stage:
            raise ValueError(f"iteration {iteration} is outside the {self.stages} stages")
        return self.stage_list()[iteration // self.iterations_per_stage]


def category_anchors(source_features: torch.Tensor, source_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CAG-UDA Eq. 4 on one batch: anchors (K, D), NaN for classes without a source pixel."""
    return class_centroids(source_features, source_labels, num_classes)


def anchor_pseudo_labels(target_features: torch.Tensor, anchors: torch.Tensor,
                         margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CAG-UDA Eq. 5-7: labels (B, h, w) of the active pixels (255 elsewhere), and d_second - d_nearest.

    target_features (B, D, h, w), anchors (K, D). A pixel equally far from two
    anchors is never active (Eq. 6 is strict).
    """
    with torch.no_grad():
        distances = pixel_distances(target_features, anchors)  # (B, K, h, w), Eq. 5
        return margin_assignment(distances, margin, dim=1)


def anchor_distance_pixels(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor) -> PixelLosses:
    """CAG-UDA Eq. 8 / Eq. 10 per pixel: ||f^s_c - f||^2 to the anchor of the pixel's class (B, h, w).

    labels (B, h, w): source ground truth (Eq. 8) or the active target labels
    of :func:`anchor_pseudo_labels` (Eq. 10; a_ij = 0 pixels are 255). The
    anchors are fixed within a stage: the gradient reaches the features only.
    Pixels count when labelled and their class has an anchor.
    """
    anchors = anchors.detach().to(features.dtype)
    labelled = labels != IGNORE_INDEX
    safe_labels = torch.where(labelled, labels, torch.zeros_like(labels))
    counts = labelled & ~absent_classes(anchors)[safe_labels]  # (B, h, w)
    targets = anchors.nan_to_num(0.0)[safe_labels].permute(0, 3, 1, 2)  # (B, D, h, w)
    per_pixel = (features - targets).square().sum(dim=1)
    return torch.where(counts, per_pixel, torch.zeros_like(per_pixel)), counts


def probability_pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability-based active labels of Eq. 11: argmax where the softmax maximum >= P_0 (B, h, w), and it.

    ``bismap.labels.strategies.assign_confidence`` on the (B, K, h, w) logits.
    """
    batch, classes, height, width = logits.shape
    rows = logits.permute(0, 2, 3, 1).reshape(-1, classes)  # (B*h*w, K)
    labels, confidence = assign_confidence(rows, threshold)
    return labels.view(batch, height, width), confidence.view(batch, height, width)
