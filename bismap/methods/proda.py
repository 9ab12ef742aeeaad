"""ProDA (paper 001): online prototypical pseudo-label denoising and target structure learning.

What the paper defines (Sec. 4.1-4.2) and what this module computes:

* Eq. 4: the prototypical weight omega_k = softmax_k(-||f~(x)_i - eta_k|| / tau),
  Euclidean distance (not squared) of the MOMENTUM encoder's feature f~ (the
  text below Eq. 4) to each class prototype eta_k (:func:`prototype_weights`);
* Eq. 3: the denoised label argmax_k(omega_k p_{t,0,k}) of the FIXED soft
  pseudo-label p_{t,0} of the warmed-up model (:func:`rectify_pseudo_labels`).
  Sec. 5.4 / Table 4: ProDA applies no confidence threshold (default 0); the
  optional threshold acts on the renormalised omega * p, as the public code's
  ``train_thred`` does;
* Eq. 5-6: prototypes are class centroids of the momentum encoder's features,
  tracked by eta <- lambda eta + (1 - lambda) eta', lambda = 0.9999, with one
  step per image and class, image after image, as the public code does
  (:func:`update_prototypes`, on :mod:`bismap.methods.prototypes`);
* Eq. 7: SCE on the denoised labels, alpha = 0.1, beta = 1
  (:func:`pseudo_label_loss_pixels`, ``bismap.losses.symmetric_cross_entropy_pixels``);
* Eq. 8-9: KL(z_T || z_T') between the prototypical soft assignments of the
  weak view (momentum encoder) and the strong view (trainable encoder)
  (:func:`structure_kl_pixels`, ``bismap.losses.kl_divergence_pixels``);
* Eq. 10: the regulariser -log p_k that keeps every class in use
  (:func:`regularization_pixels`).

Normalisation (the project's rule: loss terms are normalised as the public
code does): Eq. 9 and Eq. 10 print sums over classes, the public code takes
means over classes (and pixels), so both are divided by K here and the
paper's gamma_1 = 10, gamma_2 = 0.1 (the public run's ``--proto_consistW 10
--regular_w 0.1``) weigh them as the public runs do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import PixelLosses, kl_divergence_pixels, symmetric_cross_entropy_pixels
from bismap.methods.prototypes import (absent_classes, centroids_from_sums, class_feature_sums,
                                       momentum_update, pixel_distances)


@dataclass(frozen=True)
class ProdaSettings:
    """ProDA's GTA5 -> Cityscapes setting (stage 1: denoising and structure learning)."""

    temperature: float = 1.0  # tau of Eq. 4 and Eq. 8 (Sec. 4.1, App. A Table 8)
    prototype_momentum: float = 0.9999  # lambda of Eq. 6 (Sec. 4.1, Table 5)
    confidence_threshold: float = 0.0  # none (Sec. 5.4, Table 4); on the renormalised omega * p
    sce_alpha: float = 0.1  # Eq. 7 (Sec. 4.1, App. A Table 9)
    sce_beta: float = 1.0  # Eq. 7
    kl_weight: float = 10.0  # gamma_1 of Eq. 11 (Sec. 4.2, Table 10), on the KL / K (public --proto_consistW 10)
    regularization_weight: float = 0.1  # gamma_2 of Eq. 11 (0 for SYNTHIA), on a mean over classes (--regular_w 0.1)
    ema_decay: float = 0.999  # momentum encoder f~: the paper gives no value; 0.999 in the public code

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"proda.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.prototype_momentum <= 1.0 or not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError("proda.prototype_momentum and proda.ema_decay must be in [0, 1]")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"proda.confidence_threshold must be in [0, 1], got {self.confidence_threshold}")


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """-||f_i - eta_k|| / tau (B, K, h, w): the logits whose softmax is Eq. 4 (and Eq. 8); -inf for absent classes."""
    return -pixel_distances(features, prototypes) / temperature


def prototype_weights(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProDA Eq. 4: omega (B, K, h, w), softmax over classes of the negative distances / tau.

    ``features`` are the momentum encoder's (B, D, h, w), raw (not normalised);
    ``prototypes`` (K, D) need at least one present class (an absent one gets
    weight 0). public code: models/adaptation_modelv2.py:348-355 is this
    computation, but multiplies the distances by ``--proto_temperature`` (an
    inverse temperature, default 1) where Eq. 4 divides by tau; the same at 1.
    """
    if bool(absent_classes(prototypes).all()):
        raise ValueError("prototype_weights needs at least one class with a prototype")
    return prototype_logits(features, prototypes, temperature).softmax(dim=1)


def rectify_pseudo_labels(soft_labels: torch.Tensor, weights: torch.Tensor, threshold: float = 0.0,
                          valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ProDA Eq. 3 (and CPSL Eq. 1): labels argmax_k(w_k p_k) (B, h, w), 255 = ignore, and their confidence.

    soft_labels (B, K, h, w): the fixed p_{t,0} (ProDA) or P_ST (CPSL);
    weights (B, K, h, w): omega of Eq. 4 (ProDA) or P_SL (CPSL). The confidence
    is the maximum of w * p renormalised over classes; a pixel is kept when it
    is >= ``threshold`` (0 keeps all, as the paper does), lies in ``valid``
    (B, h, w) and has a nonzero w * p.
    """
    rectified = weights * soft_labels  # (B, K, h, w), Eq. 3 before xi()
    total = rectified.sum(dim=1)  # (B, h, w)
    confidence, labels = (rectified / total.clamp_min(torch.finfo(total.dtype).tiny)[:, None]).max(dim=1)
    kept = (total > 0) & (confidence >= threshold)
    if valid is not None:
        kept &= valid.bool()
    return torch.where(kept, labels, torch.full_like(labels, IGNORE_INDEX)), confidence


def update_prototypes(prototypes: torch.Tensor, momentum_features: torch.Tensor, labels: torch.Tensor,
                      momentum: float, minimum_pixels: int = 1) -> torch.Tensor:
    """ProDA Eq. 6 as the public code applies it: one momentum step per image and per class of that image.

    prototypes (K, D), NaN for classes never seen; momentum_features
    (B, D, h, w); labels (B, h, w), 255 = ignore. For each image in batch
    order, each class with at least ``minimum_pixels`` pixels there moves its
    prototype towards that image's centroid (Eq. 5 on one image), so a class
    seen in n images moves n times per batch (public code:
    models/adaptation_modelv2.py:256-259 loops over calculate_mean_vector's
    per-image vectors, 113-141, which skips classes with < 10 pixels, line 133).
    """
    if minimum_pixels < 1:
        raise ValueError(f"minimum_pixels must be >= 1, got {minimum_pixels}")
    updated = prototypes.detach()
    for image_features, image_labels in zip(momentum_features.detach(), labels):  # (D, h, w), (h, w)
        sums, counts = class_feature_sums(image_features[None], image_labels[None], prototypes.shape[0])
        counts = torch.where(counts >= minimum_pixels, counts, torch.zeros_like(counts))  # (K,)
        updated = momentum_update(updated, centroids_from_sums(sums, counts), momentum)  # NaN rows: no step
    return updated


def pseudo_label_loss_pixels(logits: torch.Tensor, labels: torch.Tensor, settings: ProdaSettings) -> PixelLosses:
    """ProDA Eq. 7: SCE of the logits (B, K, h, w) on the denoised labels (B, h, w), per pixel."""
    return symmetric_cross_entropy_pixels(logits, labels, settings.sce_alpha, settings.sce_beta)


def structure_kl_pixels(weak_momentum_features: torch.Tensor, strong_features: torch.Tensor,
                        prototypes: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> PixelLosses:
    """ProDA Eq. 8-9 per pixel: KL(z_T || z_T') / K, z = softmax_k(-||f - eta_k|| / tau).

    weak_momentum_features: f~(T(x)) (B, D, h, w), the teacher (no gradient);
    strong_features: f(T'(x)) (B, D, h, w) from the trainable encoder, at the
    same pixels (the caller maps the weak view onto the strong one). mask
    (B, h, w): the pixels present in both views. Absent classes are dropped
    (their assignment is 0 in both views and would only add 0 * log 0). The
    divergence is divided by K, all classes (the public code's mean over classes).
    """
    present = prototypes[~absent_classes(prototypes)]  # (K', D)
    teacher_logits = prototype_logits(weak_momentum_features.detach(), present, temperature)  # (B, K', h, w)
    student_logits = prototype_logits(strong_features, present, temperature)
    divergence, kept = kl_divergence_pixels(teacher_logits, student_logits, mask)  # (B, h, w)
    # public code: models/adaptation_modelv2.py:247-248 averages the (B, K, h, w) terms, i.e. divides by K
    return divergence / prototypes.shape[0], kept


def regularization_pixels(logits: torch.Tensor, mask: torch.Tensor | None = None) -> PixelLosses:
    """ProDA Eq. 10 per pixel, as a mean over classes: -(1/K) sum_k log p_k (B, h, w), smallest (log K) at uniform p.

    public code: models/adaptation_modelv2.py:274-275 (``MRKLD``) divides the sum by B*K*h*w.
    """
    per_pixel = -F.log_softmax(logits.float(), dim=1).mean(dim=1)  # (B, h, w)
    return per_pixel, None if mask is None else mask.to(per_pixel.dtype)
