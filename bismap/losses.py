"""The adaptation losses, each a plain function of logits and targets.

* :func:`weighted_cross_entropy`: BiSMAP Eq. 10, source cross-entropy with the
  transferability map ``w^s`` as a per-pixel weight.
* :func:`symmetric_cross_entropy`: BiSMAP Eq. 11 (Wang et al.'s SCE), on the
  target pseudo-labels.
* :func:`kl_divergence`: KL(teacher || student) per pixel, for the EMA
  consistency of BiSMAP Eq. 12 and the distillation term of ProDA Eq. 12.

The paper writes each loss as a sum over the H x W pixels; here every loss is
the MEAN over the pixels that carry a target (labelled, or inside the image
after a geometric augmentation), so the weights of Eq. 13 do not change with
the crop size. Ignored pixels (label 255) contribute nothing.

Multi-process training needs the mean over the pixels of the GLOBAL batch, of
which each process holds a slice: each loss has a ``*_pixels`` twin that returns
the per-pixel values and the mask of the pixels that count, and
:func:`masked_sum` turns those into (sum, count) for
``bismap.training.distributed.global_mean_loss``. The losses themselves are
:func:`masked_mean` of the same pair, computed exactly as before.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from bismap.data.samples import IGNORE_INDEX

SCE_LABEL_FLOOR = 1e-4  # BiSMAP Sec. 3.5: the one-hot label is clamped to [1e-4, 1]

# (per-pixel loss (B, H, W), the pixels that count (B, H, W) bool or float, or None for all of them)
PixelLosses = tuple[torch.Tensor, torch.Tensor | None]


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``values`` over ``mask``, number of pixels in ``mask``): both (), no division.

    The part of a mean that adds up over processes (``global_mean_loss(*masked_sum(...))``).
    """
    if mask is None:
        return values.sum(), torch.tensor(values.numel(), device=values.device)
    return (values * mask).sum(), mask.sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shape; None = all); 0 (with a gradient path) when it is empty."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weights: torch.Tensor | None = None) -> torch.Tensor:
    """BiSMAP Eq. 10: mean over labelled pixels of -w_i log p_{i, y_i} (see :func:`weighted_cross_entropy_pixels`)."""
    return masked_mean(*weighted_cross_entropy_pixels(logits, labels, weights))


def weighted_cross_entropy_pixels(logits: torch.Tensor, labels: torch.Tensor,
                                  weights: torch.Tensor | None = None) -> PixelLosses:
    """BiSMAP Eq. 10 per pixel, -w_i log p_{i, y_i}, and the labelled pixels (B, H, W).

    logits (B, K, H, W), labels (B, H, W) with 255 = ignore, weights (B, H, W)
    in [0, 1] or None (plain cross-entropy). The mean divides by the number of
    labelled pixels, not by the sum of the weights: a down-weighted pixel must
    lower its share of the loss, not be renormalised back.
    """
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    if weights is not None:
        per_pixel = per_pixel * weights
    return per_pixel, labels != IGNORE_INDEX


def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                            label_floor: float = SCE_LABEL_FLOOR) -> torch.Tensor:
    """BiSMAP Eq. 11, mean over labelled pixels (see :func:`symmetric_cross_entropy_pixels`)."""
    return masked_mean(*symmetric_cross_entropy_pixels(logits, labels, alpha, beta, label_floor))


def symmetric_cross_entropy_pixels(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                                   label_floor: float = SCE_LABEL_FLOOR) -> PixelLosses:
    """BiSMAP Eq. 11 per pixel: sum_c -alpha y_c log p_c - beta p_c log y_c, y one-hot clamped to [floor, 1].

    With y clamped, log y_c is 0 for the labelled class and log(floor) for the
    others, so the reverse term is -log(floor) * (1 - p_{y}). logits (B, K, H, W),
    labels (B, H, W) with 255 = ignore; returns (B, H, W) values and the labelled pixels.
    """
    log_probabilities = F.log_softmax(logits.float(), dim=1)  # (B, K, H, W)
    labelled = labels != IGNORE_INDEX
    safe_labels = torch.where(labelled, labels, torch.zeros_like(labels)).unsqueeze(1)  # (B, 1, H, W)
    log_p_label = log_probabilities.gather(1, safe_labels).squeeze(1)  # (B, H, W)
    forward = -log_p_label
    reverse = -math.log(label_floor) * (1.0 - log_p_label.exp())
    return alpha * forward + beta * reverse, labelled


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pixels of KL(p_teacher || p_student) (BiSMAP Eq. 12; see :func:`kl_divergence_pixels`)."""
    return masked_mean(*kl_divergence_pixels(teacher_logits, student_logits, mask))


def kl_divergence_pixels(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                         mask: torch.Tensor | None = None) -> PixelLosses:
    """KL(p_teacher || p_student) = sum_c p~_c (log p~_c - log p_c) per pixel (B, H, W), and ``mask``.

    Both arguments are LOGITS (B, K, H, W); the student enters as
    log-probabilities, which is what ``F.kl_div`` expects as its input (passing
    probabilities there, as ProDA's public code does, computes something that is
    not a divergence). No gradient flows into the teacher. mask (B, H, W): the
    pixels that count (e.g. inside the image after a geometric augmentation).
    """
    teacher_log = F.log_softmax(teacher_logits.detach().float(), dim=1)  # (B, K, H, W)
    student_log = F.log_softmax(student_logits.float(), dim=1)  # (B, K, H, W)
    per_pixel = F.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(dim=1)  # (B, H, W)
    return per_pixel, None if mask is None else mask.to(per_pixel.dtype)
