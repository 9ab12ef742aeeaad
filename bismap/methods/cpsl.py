"""CPSL (paper 002): class-balanced pixel-level self-labeling.

What the paper defines (Sec. 3.2-3.4) and what this module computes:

* Eq. 4: p_m = softmax(f_SL(z_m) / tau) of L2-normalised pixel features z_m
  (:func:`cluster_probabilities`, :func:`self_labeling_scores`); Eq. 7: the head
  starts from the class centroids of the normalised features under the hard
  warmup labels Y_ST (:func:`initial_head_weights`);
* Eq. 5-6 and 12: the self-labels Q solve an entropic optimal transport with
  marginals r = delta_pseudo over classes and 1/M over pixels, by
  Sinkhorn-Knopp on exp(f_SL(Z) / epsilon) (:func:`sinkhorn_knopp`); Sec. 3.2
  "Online Cluster Assignment": Q is computed over [memory bank; current
  pixels] and only the current rows are used (:func:`online_assignments`,
  :func:`enqueue`); L_SL = -sum_c q_c log p_c (:func:`self_labeling_loss_pixels`);
* Eq. 1: the rectified label argmax(P_SL * P_ST), the same computation as
  ProDA Eq. 3 (``bismap.methods.proda.rectify_pseudo_labels`` with P_SL as the
  weight);
* Eq. 8-9: class-balanced sampling of M pixels per image, M_c = floor(M delta_n^c),
  topped up at random (:func:`class_balanced_sample`);
* Eq. 8, 10-11: distribution alignment, the per-image class distribution
  delta_n and its moving average delta_pseudo (:func:`image_class_distribution`,
  :func:`class_distribution_from_counts`, :func:`update_class_distribution`);
* Eq. 13 as the public code computes it (:func:`consistency_pixels`):
  KL(P_w || P_s) only, averaged over the classes;
* the public code's recipe beyond the paper: a second self-labelling target,
  the Sinkhorn-Knopp transport of the momentum network's L2-normalised
  segmentation logits (:func:`output_rows`), and the symmetric cross-entropy on
  the rectified labels (:func:`target_label_pixels`).

Where this follows the paper rather than its public code: the public code keeps
r fixed at the warmup distribution (no Eq. 11) and samples pixels uniformly
(no Eq. 9); both are implemented here as the paper describes them. The public
code does apply the rectification of Eq. 1 (``--proto_rectify`` in its README
command; models/adaptation_modelv2.py:227-233). The Sinkhorn iteration count
is not in the paper: 3 is the public code's default (as in SwAV). The
iterations run in the log domain, which is the same algorithm without the
overflow of exp(score / 0.05) for large scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bismap.data.samples import IGNORE_INDEX
from bismap.losses import PixelLosses, kl_divergence_pixels, symmetric_cross_entropy_pixels
from bismap.methods.prototypes import class_centroids, class_pixel_counts  # counts: Eq. 10's numerator


@dataclass(frozen=True)
class CpslSettings:
    """CPSL's GTA5 -> Cityscapes setting (Sec. 4.1)."""

    epsilon: float = 0.05  # entropic regularisation of Eq. 6 (Sec. 4.1)
    temperature: float = 0.08  # tau of Eq. 4 (Sec. 4.1)
    sinkhorn_iterations: int = 3  # not in the paper: the public code's default
    self_labeling_weight: float = 0.1  # lambda_1 of Eq. 14 (Sec. 4.1)
    consistency_weight: float = 5.0  # lambda_2 of Eq. 14 (Sec. 4.1)
    samples_per_image: int = 512  # M of Eq. 9 (Sec. 4.1, Table 4)
    memory_length: int = 65_536  # pixel features in the memory bank (Sec. 3.2, 4.1)
    distribution_momentum: float = 0.999  # alpha of Eq. 11: not in the paper; its other momenta (Sec. 4.1)
    ema_decay: float = 0.999  # momentum networks f'_SEG, f'_SL (Sec. 4.1)
    target_ce_weight: float = 0.1  # not in the paper: the public code's --rce with rce_alpha 0.1 ...
    target_reverse_ce_weight: float = 1.0  # ... and rce_beta 1.0 (public code: parser_train.py:52-54)

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.temperature <= 0:
            raise ValueError("cpsl.epsilon and cpsl.temperature must be > 0")
        if self.sinkhorn_iterations < 1 or self.samples_per_image < 1 or self.memory_length < 0:
            raise ValueError("cpsl.sinkhorn_iterations and samples_per_image must be >= 1, memory_length >= 0")
        if not 0.0 <= self.distribution_momentum <= 1.0 or not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError("cpsl.distribution_momentum and cpsl.ema_decay must be in [0, 1]")
        if self.target_ce_weight < 0 or self.target_reverse_ce_weight < 0:
            raise ValueError("cpsl.target_ce_weight and cpsl.target_reverse_ce_weight must be >= 0")


def _checked_distribution(distribution: torch.Tensor) -> torch.Tensor:
    if bool((distribution < 0).any()) or not float(distribution.sum()) > 0:
        raise ValueError("the class distribution must be non-negative with a positive sum")
    return distribution / distribution.sum()


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, class_distribution: torch.Tensor, epsilon: float,
                   iterations: int) -> torch.Tensor:
    """CPSL Eq. 5-6, 12: the transport plan Q (N, K) ~ diag(a) exp(scores / epsilon) diag(b).

    scores (N, K): f_SL(z) of N pixels (any real numbers; log-probabilities
    work with epsilon = 1). class_distribution r (K,), non-negative
    (normalised here). Each iteration scales the class columns to sum to r,
    then the pixel rows to sum to 1/N, so after any number of iterations the
    rows are exact and the columns approach r (CPSL's r = delta_pseudo,
    h = 1/M, transposed). A class with r_c = 0 receives nothing.
    """
    target = _checked_distribution(class_distribution.double().to(scores.device))  # (K,)
    log_target = target.log()  # -inf where r_c = 0
    used = target > 0
    log_plan = (scores.double() / epsilon).masked_fill(~used[None], -torch.inf)  # (N, K)
    log_row = -math.log(scores.shape[0])
    for _ in range(iterations):
        column_shift = log_target - torch.logsumexp(log_plan, dim=0)  # (K,)
        log_plan = log_plan + torch.where(used, column_shift, torch.zeros_like(column_shift))[None]
        log_plan = log_plan + (log_row - torch.logsumexp(log_plan, dim=1, keepdim=True))
    return log_plan.exp().to(scores.dtype)


def online_assignments(current_scores: torch.Tensor, memory_scores: torch.Tensor | None,
                       class_distribution: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Sec. 3.2: Q_aug over [memory; current] pixels, and the soft labels q_m of the current ones (M, K).

    current_scores (M, K), memory_scores (L, K) (the memory bank's features
    scored by the CURRENT head) or None. Rows of the result sum to 1.
    """
    scores = current_scores if memory_scores is None else torch.cat([memory_scores, current_scores])
    plan = sinkhorn_knopp(scores, class_distribution, epsilon, iterations)  # (L + M, K)
    return plan[-current_scores.shape[0]:] * scores.shape[0]


def enqueue(memory: torch.Tensor | None, rows: torch.Tensor, length: int) -> torch.Tensor:
    """The memory bank (Sec. 3.2): ``rows`` appended, only the newest ``length`` rows kept; no gradient."""
    stacked = rows.detach() if memory is None else torch.cat([memory, rows.detach()])
    return stacked[max(0, stacked.shape[0] - length):]


def self_labeling_scores(features: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """f_SL(z) for (M, D) features: cosine of the normalised features (Sec. 3.2) with the head's (K, D) rows."""
    return F.normalize(features, dim=1) @ F.normalize(head_weights, dim=1).T  # (M, K)


def initial_head_weights(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CPSL Eq. 7: centroids (K, D) of the normalised features (B, D, h, w) under hard labels Y_ST; NaN if absent."""
    return class_centroids(F.normalize(features, dim=1), labels, num_classes)


def cluster_logits(features: torch.Tensor, head_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """f_SL(z) / tau for a feature map (B, D, h, w) -> (B, K, h, w): the logits of Eq. 4."""
    unit_features = F.normalize(features, dim=1)  # (B, D, h, w)
    scores = torch.einsum("bdhw,kd->bkhw", unit_features, F.normalize(head_weights, dim=1))
    return scores / temperature


def cluster_probabilities(features: torch.Tensor, head_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """CPSL Eq. 4 for a feature map: P_SL (B, K, h, w) = softmax_c(f_SL(z) / tau)."""
    return cluster_logits(features, head_weights, temperature).softmax(dim=1)


def self_labeling_loss_pixels(scores: torch.Tensor, assignments: torch.Tensor, temperature: float) -> PixelLosses:
    """CPSL Eq. 5 per pixel: -sum_c q_c log p_c with p = softmax(scores / tau) (M,); all pixels count."""
    log_probabilities = F.log_softmax(scores.float() / temperature, dim=1)  # (M, K)
    return -(assignments.detach().float() * log_probabilities).sum(dim=1), None


def class_distribution_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """CPSL Eq. 10: delta_pseudo|_0, the share of each class among the labelled pixels."""
    return _checked_distribution(counts.double())


def image_class_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CPSL Eq. 8: delta_n (B, K) per image over its labelled pixels (zeros for an image with none).

    Eq. 8 divides by H x W; CPSL's rectified labels cover every pixel, so this
    is the same there, and stays a distribution where crops add ignored pixels.
    """
    counts = torch.stack([class_pixel_counts(image, num_classes) for image in labels])  # (B, K)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def update_class_distribution(distribution: torch.Tensor, image_distributions: torch.Tensor,
                              momentum: float) -> torch.Tensor:
    """CPSL Eq. 11, once per image in batch order: delta <- alpha delta + (1 - alpha) delta_n.

    image_distributions (B, K) from :func:`image_class_distribution`; an image
    without labelled pixels (a zero row) leaves the distribution as it is.
    """
    for image_distribution in image_distributions.to(distribution.dtype):
        if float(image_distribution.sum()) > 0:
            distribution = momentum * distribution + (1.0 - momentum) * image_distribution
    return distribution


def class_balanced_sample(labels: torch.Tensor, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """CPSL Eq. 8-9: indices (ascending) of ``samples`` labelled pixels of one image's flat (P,) labels.

    Each class c contributes floor(samples * delta_n^c) random pixels of its
    own; the rest up to ``samples`` are drawn at random from the labelled
    pixels not yet chosen. An image with fewer labelled pixels gives them all.
    """
    labelled = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)  # (n,)
    if labelled.numel() <= samples:
        return labelled
    chosen = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    for class_id in torch.unique(labels[labelled]).tolist():
        members = labelled[labels[labelled] == class_id]
        quota = (samples * members.numel()) // labelled.numel()  # floor(M * delta_n^c), Eq. 9
        order = torch.randperm(members.numel(), generator=generator, device="cpu").to(labels.device)
        chosen[members[order[:quota]]] = True
    remaining = labelled[~chosen[labelled]]
    order = torch.randperm(remaining.numel(), generator=generator, device="cpu").to(labels.device)
    chosen[remaining[order[:samples - int(chosen.sum())]]] = True
    return torch.nonzero(chosen).squeeze(1)


def consistency_pixels(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                       mask: torch.Tensor | None = None) -> PixelLosses:
    """CPSL Eq. 13 as the public code computes it, per pixel: KL(P_w || P_s) / K.

    Both (B, K, h, w) logits at the same pixels, P_w from the momentum network
    (no gradient); mask (B, h, w) as in ``bismap.losses.kl_divergence_pixels``.
    The paper prints the symmetric KL summed over classes; the public code takes
    one direction, F.kl_div(log P_s, P_w), and divides its masked sum by the
    count of (pixel, class) entries (public code: models/adaptation_modelv2.py:344-345),
    so lambda_2 = 5 weighs this per-pixel mean.
    """
    forward, mask = kl_divergence_pixels(weak_logits, strong_logits, mask)  # (B, h, w), summed over K
    return forward / weak_logits.shape[1], mask


def output_rows(logits: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """The sampled pixels' L2-normalised logits (M, K) of (b, K, h, w) maps; indices[i]: flat indices of image i.

    The public code's second self-labelling target runs Sinkhorn-Knopp on the
    momentum network's segmentation logits normalised to unit length per pixel
    (public code: models/adaptation_modelv2.py:251-255, 279-298).
    """
    rows = torch.cat([image.flatten(1)[:, index].T for image, index in zip(logits, indices)])  # (M, K)
    return F.normalize(rows.float(), dim=1)


def target_label_pixels(logits: torch.Tensor, labels: torch.Tensor, settings: CpslSettings) -> PixelLosses:
    """L_SEG^t (Eq. 2) as the public code trains it: 0.1 CE + 1.0 reverse CE on the rectified labels (B, h, w).

    Public code: models/adaptation_modelv2.py:300-302 and its rce() at 372-380
    (one-hot clamped to [1e-4, 1], both terms means over labelled pixels).
    """
    return symmetric_cross_entropy_pixels(logits, labels, settings.target_ce_weight,
                                          settings.target_reverse_ce_weight)
