"""Class-distribution alignment of the self-training targets to the source class distribution.

Self-training amplifies whichever class the warmup over-predicts on the target.
On the embedded benchmark's seed 1 the warmup gives digit 0 5.6% of its softmax
mass on the target where every digit holds ~2% of the source labels, and one
round of plain self-training raises it to 9.2%; the MAPs labels make it 4.6% of
the labelled pixels at 39% precision, and after two plain rounds 37% of the
digit-4 pixels are called 0. Two corrections, both
driven by running class distributions (exponential moving averages over the
batches) and both this project's additions to BiSMAP:

* the teacher's targets of Eq. 12, as in ReMixMatch's distribution alignment:
  q_c(x) ∝ p_c(x) * pi_source_c / pi_predicted_c, where pi_predicted is the
  teacher's mean prediction on the target (CPSL Eq. 11 tracks the same
  running class distribution for its Sinkhorn marginals);
* the pixels of the SCE term (Eq. 11) weighted per pseudo-label class by
  min(cap, pi_source_c / pi_labels_c), pi_labels being the pseudo-labels' own
  class distribution: an over-labelled class counts less, an under-labelled
  one more (the class-balanced losses of CBST and its successors).
"""

from __future__ import annotations

import torch

from bismap.data.samples import IGNORE_INDEX


def predicted_class_mass(probabilities: torch.Tensor) -> torch.Tensor:
    """Softmax summed over the pixels of (B, K, h, w) probabilities: (K,) float64, totalling B * h * w."""
    return probabilities.double().sum(dim=(0, 2, 3))


def shares(counts: torch.Tensor) -> torch.Tensor:
    """(K,) counts as a distribution; zeros stay zeros when nothing was counted.

    Sum the counts over processes before dividing, so N processes get the shares of the global batch.
    """
    return counts / counts.sum().clamp_min(1.0)


class ClassDistributions(torch.nn.Module):
    """Running class distributions: source labels, the teacher's target predictions, the target pseudo-labels.

    All start uniform (no correction) and follow exponential moving averages with
    ``momentum``, so a correction settles within ~1 / (1 - momentum) iterations.
    Buffers, so the resume state carries them.
    """

    def __init__(self, num_classes: int, momentum: float, weight_cap: float = 5.0) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"distribution alignment momentum must be in [0, 1), got {momentum}")
        if weight_cap < 1.0:
            raise ValueError(f"the pseudo-label weight cap must be >= 1, got {weight_cap}")
        self.momentum, self.weight_cap = momentum, weight_cap
        uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        for name in ("source", "predicted", "labels"):
            self.register_buffer(name, uniform.clone())

    @torch.no_grad()
    def update(self, source: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """Move each running distribution towards this batch's (K,) shares."""
        for running, share in ((self.source, source), (self.predicted, predicted), (self.labels, labels)):
            running.mul_(self.momentum).add_(share.to(running), alpha=1.0 - self.momentum)

    def align(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) probabilities reweighted by pi_source / pi_predicted per class, renormalised."""
        ratio = (self.source / self.predicted.clamp_min(1e-12)).to(probabilities)  # (K,)
        aligned = probabilities * ratio[None, :, None, None]
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def label_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights (B, H, W) of pseudo-labels (B, H, W): min(cap, pi_source / pi_labels) of the class, 0 if ignored."""
        ratio = (self.source / self.labels.clamp_min(1e-12)).clamp(max=self.weight_cap).float()  # (K,)
        labelled = labels != IGNORE_INDEX
        return torch.where(labelled, ratio[torch.where(labelled, labels, torch.zeros_like(labels))], 0.0)
