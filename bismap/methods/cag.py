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
* Eq. 8 and 10: the category-wise distance loss of source pixels (ground
  truth) and of active target pixels (their anchor label), normalised as the
  public code does: SmoothL1 between per-image class means and the anchors,
  averaged over feature dimensions and (image, class) pairs
  (:func:`anchor_distance_pairs`); the paper prints a per-pixel squared
  distance summed over pixels;
* Eq. 9 and 11: cross-entropy on the active target pixels, by anchors and by
  predicted probability > P0 of the stage's frozen initial model
  (``bismap.losses.weighted_cross_entropy_pixels`` on the labels of
  :func:`anchor_pseudo_labels` / :func:`probability_pseudo_labels`);
* Sec. 3.4, Algorithm 1: the stagewise schedule (:class:`CagSchedule`).

Public code consulted: RogerZhangzz/CAG_UDA, commit 422f99e (train.py,
models/adaptation_model.py, models/utils.py, cac.py). Where this module follows
it rather than the paper, the function says so with the public file and line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bismap.data.samples import IGNORE_INDEX
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


# The public code's normalisation of Eq. 8 / 10 (RogerZhangzz/CAG_UDA, commit 422f99e).
MINIMUM_CLASS_PIXELS = 10  # public code: models/adaptation_model.py:252, fewer agreeing pixels: no class mean
LARGE_DISTANCE = 5.0  # public code: models/adaptation_model.py:324-325, a larger value is divided by 10 until <= 5
DISTANCE_SCALE = 10.0  # public code: models/adaptation_model.py:327, the pair mean is multiplied by 10


def class_mean_features(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class the mean feature (B, K, D) of the pixels labelled c AND predicted c, and their count (B, K).

    features (B, D, h, w), labels (B, h, w) (255 = ignore), logits (B, K, h, w)
    of the network being trained. Public code: models/adaptation_model.py:239-260.
    The forward value is the plain mean; its gradient is multiplied by
    2 n_c / (h w) (models/utils.py:17-34, adaptation_model.py:255-256), so each
    pixel gets 2 / (h w) of the gradient instead of 1 / n_c.
    """
    height, width = features.shape[-2:]
    classes = torch.arange(num_classes, device=labels.device)[None, :, None, None]  # (1, K, 1, 1)
    agree = (labels[:, None] == classes) & (logits.argmax(dim=1, keepdim=True) == classes)  # (B, K, h, w)
    weights = agree.to(features.dtype)
    counts = weights.sum(dim=(2, 3))  # (B, K)
    means = torch.einsum("bdhw,bkhw->bkd", features, weights) / counts.clamp_min(1.0)[..., None]
    gradient_scale = (2.0 * counts / (height * width))[..., None]  # (B, K, 1)
    return means.detach() + gradient_scale * (means - means.detach()), counts


def anchor_distance_pairs(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                          anchors: torch.Tensor) -> PixelLosses:
    """CAG-UDA Eq. 8 / 10 as the public code computes them: one value per (image, class) pair (B, K) and the pairs.

    Per pair: SmoothL1 (beta 1) between the class mean of :func:`class_mean_features`
    and the class's anchor, averaged over the D feature dimensions, divided by 10
    while above 5, times 10 (models/adaptation_model.py:318-329); the term is the
    mean over the pairs of the batch (``masked_mean``). A pair counts with at
    least 10 agreeing pixels and an anchor. labels (B, h, w): source ground truth
    (Eq. 8) or active target labels (Eq. 10). The anchors get no gradient. The
    paper writes a per-pixel ||f^s_c - f||^2 summed over pixels instead.
    """
    anchors = anchors.detach().to(features.dtype)
    means, counts = class_mean_features(features, labels, logits, anchors.shape[0])  # (B, K, D), (B, K)
    targets = anchors.nan_to_num(0.0)[None].expand_as(means)  # (B, K, D)
    distances = F.smooth_l1_loss(means, targets, reduction="none").mean(dim=2)  # (B, K)
    divisor = torch.ones_like(distances)
    while bool((distances.detach() / divisor > LARGE_DISTANCE).any()):
        divisor = torch.where(distances.detach() / divisor > LARGE_DISTANCE, divisor * 10.0, divisor)
    counted = (counts >= MINIMUM_CLASS_PIXELS) & ~absent_classes(anchors)[None]  # (B, K)
    values = DISTANCE_SCALE * distances / divisor
    return torch.where(counted, values, torch.zeros_like(values)), counted


def probability_pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability-based active labels of Eq. 11: argmax where the softmax maximum > P_0 (B, h, w), and it.

    logits (B, K, h, w) of the stage's frozen initial model. Strictly greater,
    as the public code (models/adaptation_model.py:44).
    """
    confidence, labels = logits.float().softmax(dim=1).max(dim=1)  # (B, h, w) each
    return torch.where(confidence > threshold, labels, torch.full_like(labels, IGNORE_INDEX)), confidence
