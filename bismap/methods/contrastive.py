"""Bi-directional contrastive learning for domain adaptive segmentation (paper 003).

What the paper defines (Sec. 3.2-3.4, supplement Sec. 1) and what this module computes:

* Eq. 1: prototypes rho_S, rho_T by masked average pooling of one source and
  one target image's features under y_S and the hybrid y_T
  (``bismap.methods.prototypes.class_centroids``);
* Eq. 2 (forward, FCL): each TARGET pixel against the SOURCE prototypes,
  -log softmax_c(s(f_T(p), rho_S(c)) / tau) at its class, s = cosine
  (:func:`forward_contrastive_pixels`); Eq. 3 (backward, BCL): each SOURCE pixel
  against the TARGET prototypes (:func:`backward_contrastive_pixels`). Both
  directions are pixel-to-prototype with the softmax over classes: "backward"
  reverses which domain gives the pixels and which the prototypes, as Eq. 3
  is written;
* Eq. 4-5: the momentum prototypes mu_S, mu_T
  (``bismap.methods.prototypes.momentum_update``, lambda = 0.999);
* Eq. 6-7: prototype calibration rho_{S->T}(c) = rho_S(c) + mu_T(c) - mu_S(c)
  (:func:`calibrated_prototypes`);
* Eq. 8-9: dynamic pseudo-labels, the class c' of the most similar calibrated
  prototype where that similarity exceeds T = 0.7 (:func:`dynamic_pseudo_labels`);
* Eq. 10: hybrid labels, the dynamic label where there is one, else the static
  one (:func:`hybrid_pseudo_labels`);
* Eq. 11: the entropy terms of L_base (:func:`entropy_pixels`);
* supplement Eq. 1: class sampling probabilities P(c) proportional to the
  inverse share of source images containing c (:func:`class_sampling_probabilities`).

Where this follows the paper rather than its public code (cvlab-yonsei/DASS,
commit f544686, ``trainer/damnet_trainer.py``): the public code has no
momentum prototypes and no calibration (Eq. 4-7); its dynamic labels
(lines 73-80) are the argmax of the uncalibrated cosines, masked by comparing
an argmax INDEX with 0.8, not a similarity with T; its hybrid labels
(lines 83-84) take the static label first and are never used by a loss: FCL,
rho_T and BCL all use the static labels (lines 97, 108-109). Here Eq. 6-10 are
built from the text, and ``label_priority`` picks Eq. 10's dynamic-first
order, the public static-first order, or the static labels alone (what the
public losses see).

Where this follows the public code: tau = 0.1 (its scale of 10; the paper
gives none); a class without a prototype stays in the softmax with
similarity -1 (line 62, ``absent_class_similarity``; the paper sums over all
of C); each term is the mean over the pixels whose class has a prototype in
the other image (lines 66-71, 108-109: both terms use the cross-entropy with
weight 1 on the classes of both images, 0 elsewhere; ``prototype_loss2`` of
line 106 is unused). ``entropy_form="public"`` gives
the public entropy term, -sum_c p_c log softmax(p)_c with p = softmax(x)
(lines 33-37: a softmax applied twice), instead of the Shannon entropy.
Where mu_S or mu_T of a class is not known yet, xi = 0 (the paper does not say).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import PixelLosses
from bismap.methods.prototypes import absent_classes, pixel_cosine_similarities


# y_T of the contrastive terms and of rho_T. "dynamic": Eq. 10, y_D where it exists, else y_F;
# "static": y_F where it exists, else y_D (public code: damnet_trainer.py:83-84, left unused there);
# "static_only": y_F alone, what the public code's FCL, rho_T and BCL use (damnet_trainer.py:97, 108-109).
LABEL_PRIORITIES = ("dynamic", "static", "static_only")
ENTROPY_FORMS = ("shannon", "public")
PROTOTYPE_SCOPES = ("pair", "batch")
# Where Eq. 11's target CE and entropy terms are taken. "image": logits upsampled to the label size, as the public
# code (DeeplabV2.py:191 upsamples its prediction; damnet_trainer.py:136-140 takes CE and entropy there); "feature":
# the (h, w) logits with nearest-downsampled y_F (releases up to 0.3.1).
LOSS_RESOLUTIONS = ("image", "feature")


@dataclass(frozen=True)
class ContrastiveSettings:
    """The paper's setting, found on GTA5 -> Cityscapes and used for all benchmarks (supplement Sec. 1)."""

    temperature: float = 0.1  # tau of Eq. 2-3: not in the paper; the public code's scale 10
    forward_weight: float = 0.5  # lambda_FC of Eq. 12 (supplement Sec. 1)
    backward_weight: float = 0.5  # lambda_BC of Eq. 12
    prototype_momentum: float = 0.999  # lambda of Eq. 4-5
    similarity_threshold: float = 0.7  # T of Eq. 8
    source_segmentation_weight: float = 1.0  # lambda^S_seg of Eq. 11
    target_segmentation_weight: float = 1.0  # lambda^T_seg
    source_entropy_weight: float = 0.4  # lambda^S_ent
    target_entropy_weight: float = 0.4  # lambda^T_ent
    static_label_interval: int = 10_000  # iterations between updates of the static labels y_F (Sec. 4.1)
    label_priority: str = "dynamic"  # Eq. 10 ("dynamic"); "static", "static_only": see LABEL_PRIORITIES
    absent_class_similarity: float | None = -1.0  # public code: damnet_trainer.py:62; None: out of the softmax
    entropy_form: str = "shannon"  # "shannon" (Eq. 11); "public": damnet_trainer.py:33-37
    prototype_scope: str = "pair"  # "pair": image i with image i (Sec. 3.2; public code: damnet_trainer.py:143-147)
    prototype_gradient: bool = True  # the contrastive terms also flow through rho_S, rho_T (public code)
    loss_resolution: str = "image"  # Eq. 11's target CE and entropies: see LOSS_RESOLUTIONS

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"contrastive.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.prototype_momentum <= 1.0 or not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError("contrastive.prototype_momentum must be in [0, 1], similarity_threshold in [-1, 1]")
        if self.static_label_interval < 1:
            raise ValueError("contrastive.static_label_interval must be >= 1")
        if (self.label_priority not in LABEL_PRIORITIES or self.entropy_form not in ENTROPY_FORMS
                or self.prototype_scope not in PROTOTYPE_SCOPES or self.loss_resolution not in LOSS_RESOLUTIONS):
            raise ValueError(f"contrastive.label_priority must be one of {LABEL_PRIORITIES}, entropy_form one of "
                             f"{ENTROPY_FORMS}, prototype_scope one of {PROTOTYPE_SCOPES}, loss_resolution one of "
                             f"{LOSS_RESOLUTIONS}")
        if self.absent_class_similarity is not None and not -1.0 <= self.absent_class_similarity <= 1.0:
            raise ValueError("contrastive.absent_class_similarity must be in [-1, 1] or null")


def prototype_contrast_pixels(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                              temperature: float, absent_similarity: float | None = None) -> PixelLosses:
    """-log softmax_c(s(f(p), rho(c)) / tau) at each pixel's class (B, h, w), and the pixels that count.

    features (B, D, h, w), labels (B, h, w) with 255 = ignore, prototypes
    (K, D) with NaN rows for classes absent from the other image. With
    ``absent_similarity`` None those classes leave the softmax; otherwise they
    stay in it with that similarity (public code: damnet_trainer.py:62, -1).
    Pixels whose class is absent do not count (no positive pair; public code:
    class weight 0, damnet_trainer.py:66-71).
    """
    absent = absent_classes(prototypes)  # (K,)
    if bool(absent.all()):
        raise ValueError("the contrastive loss needs at least one prototype")
    similarities = pixel_cosine_similarities(features, prototypes)  # (B, K, h, w), -inf if absent
    if absent_similarity is not None:
        similarities = similarities.masked_fill(absent[None, :, None, None], absent_similarity)
    log_probabilities = F.log_softmax(similarities / temperature, dim=1)
    labelled = labels != IGNORE_INDEX
    safe_labels = torch.where(labelled, labels, torch.zeros_like(labels))
    positive = log_probabilities.gather(1, safe_labels[:, None])[:, 0]  # (B, h, w)
    counts = labelled & ~absent[safe_labels]
    return torch.where(counts, -positive, torch.zeros_like(positive)), counts


def forward_contrastive_pixels(target_features: torch.Tensor, target_labels: torch.Tensor,
                               source_prototypes: torch.Tensor, temperature: float,
                               absent_similarity: float | None = None) -> PixelLosses:
    """Eq. 2 (FCL) per pixel: target pixels f_T under the hybrid labels y_T against the source prototypes rho_S."""
    return prototype_contrast_pixels(target_features, target_labels, source_prototypes, temperature,
                                     absent_similarity)


def backward_contrastive_pixels(source_features: torch.Tensor, source_labels: torch.Tensor,
                                target_prototypes: torch.Tensor, temperature: float,
                                absent_similarity: float | None = None) -> PixelLosses:
    """Eq. 3 (BCL) per pixel: source pixels f_S under the ground truth y_S against the target prototypes rho_T."""
    return prototype_contrast_pixels(source_features, source_labels, target_prototypes, temperature,
                                     absent_similarity)


def calibrated_prototypes(source_prototypes: torch.Tensor, source_momentum: torch.Tensor,
                          target_momentum: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: rho_{S->T}(c) = rho_S(c) + xi(c), xi(c) = mu_T(c) - mu_S(c); (K, D), NaN where rho_S is.

    xi(c) = 0 for a class whose mu_S or mu_T is not known yet (the paper
    does not say; no estimate of the bias means no correction).
    """
    bias = target_momentum - source_momentum  # (K, D), Eq. 6
    bias = torch.where(torch.isnan(bias).any(dim=1, keepdim=True), torch.zeros_like(bias), bias)
    return source_prototypes + bias.detach()


def dynamic_pseudo_labels(target_features: torch.Tensor, calibrated: torch.Tensor,
                          threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8-9: labels (B, h, w), c' = argmax_c s(f_T(p), rho_{S->T}(c)) where that s > T (else 255), and s.

    Only the classes of the current source image have a calibrated prototype;
    a target pixel can only take one of them. No gradient: these are labels.
    """
    with torch.no_grad():
        similarities = pixel_cosine_similarities(target_features, calibrated)  # (B, K, h, w)
        best, labels = similarities.max(dim=1)  # (B, h, w)
    return torch.where(best > threshold, labels, torch.full_like(labels, IGNORE_INDEX)), best


def hybrid_pseudo_labels(dynamic_labels: torch.Tensor, static_labels: torch.Tensor,
                         priority: str = "dynamic") -> torch.Tensor:
    """y_T from y_D and y_F (255 where neither), in the order of ``priority`` (see LABEL_PRIORITIES).

    "dynamic": Eq. 10, y_D where it exists, else y_F; "static": y_F where it
    exists, else y_D (public code: damnet_trainer.py:83-84); "static_only": y_F.
    """
    if priority == "dynamic":
        return torch.where(dynamic_labels != IGNORE_INDEX, dynamic_labels, static_labels)
    if priority == "static":
        return torch.where(static_labels != IGNORE_INDEX, static_labels, dynamic_labels)
    if priority == "static_only":
        return static_labels
    raise ValueError(f"unknown label priority {priority!r}; expected one of {LABEL_PRIORITIES}")


def entropy_pixels(logits: torch.Tensor, mask: torch.Tensor | None = None, form: str = "shannon") -> PixelLosses:
    """The entropy terms of Eq. 11 per pixel (B, h, w), and ``mask``; summed over classes, natural log.

    "shannon": -sum_c p_c log p_c with p = softmax(x). "public": -sum_c p_c
    log softmax(p)_c, the public code's term (damnet_trainer.py:33-37 applies
    log_softmax to the probabilities), which is logsumexp(p) - sum_c p_c^2.
    """
    probabilities = F.softmax(logits.float(), dim=1)  # (B, K, h, w)
    if form == "shannon":
        log_terms = F.log_softmax(logits.float(), dim=1)
    elif form == "public":
        log_terms = F.log_softmax(probabilities, dim=1)
    else:
        raise ValueError(f"unknown entropy form {form!r}; expected one of {ENTROPY_FORMS}")
    per_pixel = -(probabilities * log_terms).sum(dim=1)
    return per_pixel, None if mask is None else mask.to(per_pixel.dtype)


def class_sampling_probabilities(class_presence: torch.Tensor) -> torch.Tensor:
    """Supplement Eq. 1: P(c) = p(c)^-1 / sum_c' p(c')^-1 from (N_images, K) bool presence; 0 for unseen classes.

    p(c) is the share of source images whose label contains c. Training then
    draws a class from P and a source image containing it.
    """
    occurrence = class_presence.double().mean(dim=0)  # p(c), (K,)
    inverse = torch.where(occurrence > 0, 1.0 / occurrence.clamp_min(1e-300), torch.zeros_like(occurrence))
    return inverse / inverse.sum()
