"""Numerical core of the Source Transferability Map (STM, BiSMAP Sec. 3.4, Eq. 8-9).

Equations as implemented (natural logarithm; the log base cancels in Eq. 8)::

    H_i   = - sum_c p_ic log p_ic                       (prediction entropy of target pixel i)
    e_c   = mean of H_i over target pixels whose pseudo label is c
    e_c'  = (e_c - e_min) / (e_max - e_min)                                      (Eq. 8)
    w_i^s = min{ exp(-D(x^s)_i^2 / d_mean^2 * log 2) + e_c', 1.0 }               (Eq. 9)

Readings of the paper where it is not explicit:

* Eq. 8 "pseudo labels": by default the pseudo label of a target pixel is the
  source model's prediction ``argmax_c p_ic`` (the brief's "predicted class");
  :meth:`ClassEntropyAccumulator.add` also accepts explicit pseudo labels
  (255 = ignore), e.g. MAPs pseudo labels.
* Eq. 8 classes never predicted on the target set get e_c' = 1.0 (the
  maximum): no target evidence, so they are treated as the least certain
  (tail) classes, and Eq. 9 then never degrades their source pixels.
  e_min / e_max are taken over the observed classes only. If all observed
  classes have the same mean entropy (e_max == e_min), they get e_c' = 0.0
  (no class-level difference; Eq. 9 reduces to its distance term).
* Eq. 9: c is the GROUND-TRUTH source class y_i^s. d_mean is the mean of
  D(x^s)_i over ALL source pixels of the whole source set (ignore pixels
  included: Eq. 7 is label-free), see :class:`MeanDistanceAccumulator`.
  Ignore pixels (label 255) get weight 0.0: in Eq. 10 y_ic^s = 0 for all c
  there, so they contribute nothing to the loss whatever w is; 0.0 makes that
  explicit and harmless even for a loss that forgets ``ignore_index``.
* Range: the exponential term is in (0, 1] and e_c' in [0, 1], so
  w in (0, 1] for labelled pixels (exactly 0.0 only if the exponential
  underflows) and the 16-bit PNG scale is W_MAX = 1.0.
"""

from __future__ import annotations

import logging
import math
import os
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

__all__ = ["IGNORE_LABEL", "IGNORE_WEIGHT", "UNSEEN_CLASS_ENTROPY", "WEIGHT_MAX", "WEIGHT_PNG_SCALE",
           "pixel_entropy", "min_max_normalize", "ClassEntropyAccumulator", "MeanDistanceAccumulator",
           "transferability_weights", "control_weights", "CONTROL_FORMS", "encode_weight_png", "decode_weight_png", "read_weight_map"]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
IGNORE_WEIGHT = 0.0  # weight of ignore pixels (see module docstring)
UNSEEN_CLASS_ENTROPY = 1.0  # e_c' of classes never predicted on the target set (Eq. 8)
WEIGHT_MAX = 1.0  # upper bound of Eq. 9 (the min{., 1.0})
WEIGHT_PNG_SCALE = 65535  # uint16 value that encodes WEIGHT_MAX


def pixel_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Prediction entropy -sum_c p_c log p_c over dim 1 of (B, C, H, W) softmax outputs -> (B, H, W), float64.

    0 log 0 is taken as 0.
    """
    probabilities = probabilities.to(torch.float64)
    terms = torch.where(probabilities > 0, probabilities * torch.log(probabilities.clamp_min(1e-300)),
                        torch.zeros_like(probabilities))
    return -terms.sum(dim=1)


def min_max_normalize(mean_entropy: np.ndarray) -> np.ndarray:
    """BiSMAP Eq. 8: e_c' = (e_c - e_min) / (e_max - e_min); NaN (unseen class) -> UNSEEN_CLASS_ENTROPY.

    mean_entropy: (C,) e_c with NaN for classes without any pixel. Returns (C,) float64 in [0, 1].
    """
    mean_entropy = np.asarray(mean_entropy, dtype=np.float64)  # (C,)
    observed = np.isfinite(mean_entropy)
    normalized = np.full(mean_entropy.shape, UNSEEN_CLASS_ENTROPY, dtype=np.float64)  # (C,)
    if not observed.any():
        logger.warning("Eq. 8: no class observed; every e_c' = %.1f", UNSEEN_CLASS_ENTROPY)
        return normalized
    entropy_min = mean_entropy[observed].min()
    entropy_range = mean_entropy[observed].max() - entropy_min
    if entropy_range > 0:
        normalized[observed] = (mean_entropy[observed] - entropy_min) / entropy_range
    else:
        normalized[observed] = 0.0
    return normalized


class ClassEntropyAccumulator:
    """Streams e_c of BiSMAP Eq. 8 over target batches: per-class entropy sums and pixel counts (float64)."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.entropy_sum = np.zeros(num_classes, dtype=np.float64)  # (C,)
        self.pixel_count = np.zeros(num_classes, dtype=np.int64)  # (C,)

    def add(self, probabilities: torch.Tensor | np.ndarray, pseudo_labels: torch.Tensor | np.ndarray | None = None
            ) -> None:
        """Add softmax outputs (B, C, H, W); pseudo labels (B, H, W) default to argmax_c (255 = ignore)."""
        probabilities = torch.as_tensor(probabilities)
        if probabilities.ndim != 4 or probabilities.shape[1] != self.num_classes:
            raise ValueError(f"probabilities must be (B, {self.num_classes}, H, W), got {tuple(probabilities.shape)}")
        entropy = pixel_entropy(probabilities).flatten()  # (B*H*W,)
        if pseudo_labels is None:
            labels = probabilities.argmax(dim=1).flatten()  # (B*H*W,)
        else:
            labels = torch.as_tensor(pseudo_labels, device=probabilities.device).to(torch.int64).flatten()
        keep = labels != IGNORE_LABEL
        labels, entropy = labels[keep], entropy[keep]
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError("pseudo labels out of range")
        sums = torch.bincount(labels, weights=entropy, minlength=self.num_classes)  # (C,)
        counts = torch.bincount(labels, minlength=self.num_classes)  # (C,)
        self.entropy_sum += sums.cpu().numpy().astype(np.float64)
        self.pixel_count += counts.cpu().numpy().astype(np.int64)

    def merge(self, other: ClassEntropyAccumulator) -> None:
        """Add another accumulator's sums and counts (fan-out over target shards)."""
        if other.num_classes != self.num_classes:
            raise ValueError("class count mismatch")
        self.entropy_sum += other.entropy_sum
        self.pixel_count += other.pixel_count

    def mean_entropy(self) -> np.ndarray:
        """e_c (C,) float64: mean entropy of the pixels pseudo-labelled c; NaN where none."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.pixel_count > 0, self.entropy_sum / np.maximum(self.pixel_count, 1), np.nan)

    def normalized(self) -> np.ndarray:
        """e_c' (C,) float64 in [0, 1] of BiSMAP Eq. 8; unseen classes get UNSEEN_CLASS_ENTROPY (1.0)."""
        return min_max_normalize(self.mean_entropy())


class MeanDistanceAccumulator:
    """d_mean of BiSMAP Eq. 9: mean of D(x^s)_i (Eq. 7) over all pixels of the whole source set.

    Exactly order-independent: each float32 distance is m * 2^e with an integer
    24-bit mantissa m; mantissas are summed exactly per exponent in Python ints,
    so any order of pixels, images or shards gives the bit-identical mean.
    """

    def __init__(self) -> None:
        self.mantissa_sums: dict[int, int] = {}  # exponent -> exact sum of integer mantissas
        self.count = 0

    def add(self, distances: np.ndarray | torch.Tensor) -> None:
        """Add distances of any shape (non-negative, finite); they are rounded to float32 first."""
        if isinstance(distances, torch.Tensor):
            distances = distances.detach().cpu().numpy()
        values = np.asarray(distances, dtype=np.float32).ravel()  # (P,)
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError("distances must be finite and non-negative")
        fractions, exponents = np.frexp(values)  # values = fractions * 2^exponents, fractions in [0.5, 1)
        mantissas = np.ldexp(fractions, 24).astype(np.int64)  # (P,) exact: float32 has 24 significant bits
        for exponent in np.unique(exponents):
            total = int(mantissas[exponents == exponent].sum())  # < 2^63 for < 2^39 pixels
            self.mantissa_sums[int(exponent)] = self.mantissa_sums.get(int(exponent), 0) + total
        self.count += values.size

    def merge(self, other: MeanDistanceAccumulator) -> None:
        """Add another accumulator (fan-out over source shards); exact."""
        for exponent, total in other.mantissa_sums.items():
            self.mantissa_sums[exponent] = self.mantissa_sums.get(exponent, 0) + total
        self.count += other.count

    def total(self) -> Fraction:
        """Exact sum of all added float32 distances."""
        return sum((Fraction(total) * Fraction(2) ** (exponent - 24)
                    for exponent, total in self.mantissa_sums.items()), Fraction(0))

    def mean(self) -> float:
        """d_mean, correctly rounded to float64; raises when nothing was added."""
        if self.count == 0:
            raise ValueError("no distances added")
        return float(self.total() / self.count)


def transferability_weights(distances: np.ndarray, labels: np.ndarray, d_mean: float,
                            class_entropy_normalized: np.ndarray) -> np.ndarray:
    """BiSMAP Eq. 9: w_i = min{exp(-D_i^2 / d_mean^2 * log 2) + e'_{y_i}, 1.0}, float32 (H, W).

    distances: D(x^s) (H, W) of Eq. 7 at label resolution; labels: ground truth
    y^s (H, W), 255 = ignore -> IGNORE_WEIGHT (0.0); d_mean > 0; class_entropy_normalized: e' (C,).
    """
    distances = np.asarray(distances, dtype=np.float64)  # (H, W)
    labels = np.asarray(labels)  # (H, W)
    entropy = np.asarray(class_entropy_normalized, dtype=np.float64)  # (C,)
    if distances.shape != labels.shape:
        raise ValueError(f"distances {distances.shape} and labels {labels.shape} differ")
    if not (math.isfinite(d_mean) and d_mean > 0):
        raise ValueError(f"d_mean must be finite and > 0, got {d_mean}")
    ignore = labels == IGNORE_LABEL  # (H, W)
    class_ids = np.where(ignore, 0, labels).astype(np.int64)  # (H, W)
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= entropy.size):
        raise ValueError(f"labels must be in [0, {entropy.size}) or {IGNORE_LABEL}")
    distance_term = np.exp(-(distances ** 2) / d_mean ** 2 * math.log(2.0))  # (H, W), Eq. 9: 1/2 at D = d_mean
    weights = np.minimum(distance_term + entropy[class_ids], WEIGHT_MAX)  # (H, W), Eq. 9
    return np.where(ignore, IGNORE_WEIGHT, weights).astype(np.float32)


def encode_weight_png(weights: np.ndarray) -> np.ndarray:
    """Weights in [0, WEIGHT_MAX] -> uint16 round(w / WEIGHT_MAX * 65535) for a 16-bit PNG (error <= 7.7e-6)."""
    weights = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(weights).all() or (weights < 0).any() or (weights > WEIGHT_MAX).any():
        raise ValueError(f"weights must be finite and in [0, {WEIGHT_MAX}]")
    return np.rint(weights / WEIGHT_MAX * WEIGHT_PNG_SCALE).astype(np.uint16)


def decode_weight_png(encoded: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_weight_png`: uint16 -> float32 weights in [0, WEIGHT_MAX]."""
    encoded = np.asarray(encoded)
    if encoded.dtype != np.uint16:
        raise ValueError(f"expected uint16, got {encoded.dtype}")
    return (encoded.astype(np.float64) * (WEIGHT_MAX / WEIGHT_PNG_SCALE)).astype(np.float32)


def read_weight_map(path: str | os.PathLike[str]) -> np.ndarray:
    """A transferability PNG -> float32 (H, W) weights in [0, 1] (value / 65535); other PNGs raise ValueError."""
    with Image.open(path) as image:
        if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"{path} is not a 16-bit weight map (PIL mode {image.mode})")
        codes = np.array(image)  # (H, W)
    if codes.ndim != 2 or codes.min(initial=0) < 0 or codes.max(initial=0) > WEIGHT_PNG_SCALE:
        raise ValueError(f"{path}: values outside the uint16 range or not 2-D ({codes.shape})")
    return decode_weight_png(codes.astype(np.uint16))


# Controls of Eq. 9 (README: isolating the STM): which part of the map carries its effect.
CONTROL_FORMS = ("eq9", "distance_only", "entropy_only", "class_mean")


def control_weights(form: str, distances: np.ndarray, labels: np.ndarray, d_mean: float,
                    class_entropy_normalized: np.ndarray, class_means: np.ndarray | None = None) -> np.ndarray:
    """Eq. 9 (``eq9``) or a control of it, float32 (H, W), ignore pixels 0:

    * ``distance_only``: e' = 0, the pixel-level distance term alone;
    * ``entropy_only``: the distance term held at its value at D = d_mean (1/2), so only e'_c varies;
    * ``class_mean``: each pixel the mean Eq. 9 weight of its class over the source set (``class_means`` (C,)),
      the map's class-level content without any pixel-level content.
    """
    if form not in CONTROL_FORMS:
        raise ValueError(f"STM form must be one of {CONTROL_FORMS}, got '{form}'")
    entropy = np.asarray(class_entropy_normalized, dtype=np.float64)  # (C,)
    if form == "distance_only":
        return transferability_weights(distances, labels, d_mean, np.zeros_like(entropy))
    if form == "entropy_only":
        return transferability_weights(np.full(np.shape(distances), d_mean), labels, d_mean, entropy)
    if form == "class_mean":
        if class_means is None:
            raise ValueError("STM form 'class_mean' needs the class means of the Eq. 9 map")
        means = np.asarray(class_means, dtype=np.float64)  # (C,)
        ignore = labels == IGNORE_LABEL
        return np.where(ignore, IGNORE_WEIGHT, means[np.where(ignore, 0, labels)]).astype(np.float32)
    return transferability_weights(distances, labels, d_mean, entropy)
