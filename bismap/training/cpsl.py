"""CPSL (paper 002, Sec. 3.1-3.4) as a self-training variant, read top to bottom.

The computations are those of :mod:`bismap.methods.cpsl`; this module runs them
in the shared adaptation loop (:mod:`bismap.training.adaptation`). Per
iteration, one source and one target batch go through the student with the
target's strong view (the BiSMAP strong view), and the loss is CPSL Eq. 14::

    L = L_ce(x^s)                       source cross-entropy
      + L_ST(x^t, Y)                    0.1 CE + 1.0 reverse CE on the rectified labels
                                        Y = argmax(P_SL * P_ST)                              (Eq. 1-2)
      + lambda_1 L_SL                   self-labelling: -sum_c q_c log p_c on M pixels/image (Eq. 4-5, 9),
                                        two targets q: Sinkhorn of the head's scores and of
                                        the momentum network's normalised logits
      + lambda_2 L_cons                 KL(P_w || P_s) / K of the cluster assignments P_SL,
                                        momentum weak view vs student strong view           (Eq. 13)

L_SL scores the MOMENTUM network's features with the trainable head f_SL, so it
trains only the head (Fig. 1, Algorithm 1 lines 7-15; public code:
models/adaptation_modelv2.py:211-216, 243-298, where the features come from the
EMA network under no_grad and only ``self.prototypes`` receives the gradient).
The target-label term, the second self-labelling target and the per-class mean
of Eq. 13 are the public code's (its README's stage-1 command: --rce,
--proto_consistW 5, --SL_lambda 0.1).

P_ST is the FIXED soft prediction of the warmed-up model (a frozen copy on the
same weak view, as ProDA's p_{t,0}); P_SL is the momentum network's self-labelling
head on its weak-view features. The soft self-labels q of the sampled pixels are
the Sinkhorn-Knopp transport (Eq. 6, 12) of the trainable head's scores of the
momentum features over [memory bank; current pixels] with class marginals
delta_pseudo, which follows the rectified labels (Eq. 8, 11). The head f_SL
(K x D cosine classifier) starts at the unit-length centroids of the warmup's
normalised target features (Eq. 7) and
delta_pseudo at its class shares (Eq. 10). The consistency term compares the
cluster assignments softmax(f'_SL(z) / tau) of the two views, as the public code
does (its ``proto_consistW`` term, with the momentum head for both views); the
paper writes Eq. 13 with the segmentation maps, and that reading collapsed the
development seed (7.6 mIoU from a 44.4 warmup with lambda_2 = 5, 45.6 without
the term after 200 iterations). Head, momentum copies, memory bank
and delta_pseudo are all in the resume state. One process only: the memory
bank and delta_pseudo are not synchronised across processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from bismap.data.strong_augment import StrongAugmentSettings
from bismap.methods.cpsl import (CpslSettings, class_balanced_sample, class_distribution_from_counts,
                                 cluster_logits, consistency_pixels, image_class_distribution,
                                 online_assignments, output_rows, self_labeling_loss_pixels,
                                 self_labeling_scores, target_label_pixels, update_class_distribution)
from bismap.methods.proda import rectify_pseudo_labels
from bismap.methods.prototypes import centroids_from_sums
from bismap.training.adaptation import (AdaptationRun, Batch, DomainData, WarmupInputs, image_cross_entropy,
                                        launch_one_process, pixel_mean, seeded_start, train_and_save)
from bismap.training.checkpoint import fingerprint, input_signature
from bismap.training.distributed import DistributedContext, unwrap_model
from bismap.training.ema import make_teacher, update_ema
from bismap.training.optim import make_optimizer
from bismap.training.selftrain import three_view_forward
from bismap.training.supervised import RunPaths, TrainSettings
from bismap.training.target_pass import own_label_class_sums

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpslTrainSettings:
    training: TrainSettings
    cpsl: CpslSettings = field(default_factory=CpslSettings)
    strong_augment: StrongAugmentSettings = field(default_factory=StrongAugmentSettings)


CpslInputs = WarmupInputs  # the initial student, the momentum network and the fixed P_ST


class SelfLabelingHead(torch.nn.Module):
    """f_SL: a cosine classifier whose (K, D) rows start at the class centroids of Eq. 7."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(weights.clone())


class SelfLabelingState(torch.nn.Module):
    """delta_pseudo (K,) and two memory banks, as buffers for the resume state.

    ``memory`` (L, D) holds momentum features, ``output_memory`` (L, K) the
    momentum network's normalised logits of the same pixels (the public code's
    ``queue`` and ``queue_out``). The banks have a fixed size (a buffer's shape
    cannot change across a resume); ``filled`` says how many newest rows hold data.
    """

    def __init__(self, class_distribution: torch.Tensor, memory_length: int, feature_dim: int) -> None:
        super().__init__()
        self.register_buffer("class_distribution", class_distribution.double().clone())
        self.register_buffer("memory", torch.zeros(memory_length, feature_dim))
        self.register_buffer("output_memory", torch.zeros(memory_length, class_distribution.numel()))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def features(self) -> torch.Tensor | None:
        """The stored features (n, D), oldest first, or None while the bank is empty."""
        count = int(self.filled)
        return self.memory[self.memory.shape[0] - count:] if count else None

    def outputs(self) -> torch.Tensor | None:
        """The stored normalised logits (n, K), oldest first, or None while the bank is empty."""
        count = int(self.filled)
        return self.output_memory[self.output_memory.shape[0] - count:] if count else None

    def push(self, rows: torch.Tensor, output_rows: torch.Tensor | None = None) -> None:
        """Append (m, D) feature rows and their (m, K) logit rows, dropping the oldest (first-in first-out)."""
        length = self.memory.shape[0]
        if length == 0:
            return
        rows = rows.detach()[-length:]
        self.memory.copy_(torch.cat([self.memory[rows.shape[0]:], rows.to(self.memory.dtype)]))
        if output_rows is not None:
            output_rows = output_rows.detach()[-length:].to(self.output_memory.dtype)
            self.output_memory.copy_(torch.cat([self.output_memory[output_rows.shape[0]:], output_rows]))
        self.filled.fill_(min(length, int(self.filled) + rows.shape[0]))


def initial_head_and_distribution(model: torch.nn.Module, manifest_path: Path, num_classes: int,
                                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 and 10 from the warmup's own hard labels Y_ST: head weights (K, D), delta_pseudo|_0 (K,).

    The centroids are scaled to unit length, as the public code initialises its
    prototypes (train.py:48-51): the head is a cosine classifier, so this only
    sets the step size its gradient takes. A class the warmup never predicts
    gets a zero row (cosine 0 with everything) and no share of the transport,
    until Eq. 11 gives it one.
    """
    sums, counts = own_label_class_sums(model, manifest_path, num_classes, device, normalize=True)
    centroids = centroids_from_sums(sums, counts).nan_to_num(0.0)  # (K, D)
    return F.normalize(centroids, dim=1), class_distribution_from_counts(counts)


def pixel_rows(maps: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """The sampled pixels' rows (M, C) of (b, C, h, w) maps; indices[i]: flat pixel indices of image i."""
    return torch.cat([image.flatten(1)[:, index].T for image, index in zip(maps, indices)])


class CpslStep:
    """CPSL Eq. 14 and one SGD step; updates the momentum copies, delta_pseudo and the memory bank."""

    def __init__(self, network: torch.nn.Module, head: SelfLabelingHead, momentum: torch.nn.Module,
                 momentum_head: SelfLabelingHead, warmup: torch.nn.Module, state: SelfLabelingState,
                 optimizer: torch.optim.Optimizer, settings: CpslTrainSettings,
                 context: DistributedContext | None = None) -> None:
        self.network, self.head, self.momentum, self.momentum_head = network, head, momentum, momentum_head
        self.warmup, self.state, self.optimizer, self.settings = warmup, state, optimizer, settings
        self.context = context or DistributedContext()
        self.device = self.context.device

    def __call__(self, source: Batch, target: Batch, iteration: int) -> dict[str, torch.Tensor]:
        cpsl = self.settings.cpsl
        source_images = source["image"].to(self.device)  # (b, 3, H, W)
        target_images = target["image"].to(self.device)  # (b, 3, H, W)
        logits, features, geometry = three_view_forward(self.network, source_images, target_images,
                                                        self.settings.strong_augment, self.settings.training.seed,
                                                        iteration, self.context)  # each (b, K|D, h, w)
        strong_features = features[2]
        labels, weak_clusters, sampled, targets = self._self_labels(target_images, iteration)
        strong_clusters = cluster_logits(strong_features, self.momentum_head.weights, cpsl.temperature)
        scores = self_labeling_scores(sampled, self.head.weights)  # (M, K): momentum features, trainable head
        valid = geometry.valid(tuple(logits[2].shape[-2:]))  # (b, h, w)
        self_labeling = sum(pixel_mean(self_labeling_loss_pixels(scores, assignments, cpsl.temperature),
                                       self.context) for assignments in targets)  # public code :258-298
        terms = {"source_ce": image_cross_entropy(logits[0], source["label"].to(self.device), self.context),
                 "target_ce": pixel_mean(target_label_pixels(logits[1], labels, cpsl), self.context),
                 "self_labeling": self_labeling,
                 "consistency": pixel_mean(consistency_pixels(geometry.warp(weak_clusters), strong_clusters, valid),
                                           self.context)}
        loss = terms["source_ce"] + terms["target_ce"] + cpsl.self_labeling_weight * terms["self_labeling"] \
            + cpsl.consistency_weight * terms["consistency"]  # Eq. 14
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        update_ema(self.momentum, unwrap_model(self.network), cpsl.ema_decay)
        update_ema(self.momentum_head, self.head, cpsl.ema_decay)
        return {"loss": loss, **terms}

    @torch.no_grad()
    def _self_labels(self, images: torch.Tensor, iteration: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Eq. 1, 8-12 on the weak view: labels Y (b, h, w), cluster logits (b, K, h, w),
        the sampled unit momentum features (M, D) and their two self-label targets q (M, K) each."""
        cpsl = self.settings.cpsl
        momentum = self.momentum(images)
        soft_labels = self.warmup(images).logits.softmax(dim=1)  # P_ST (b, K, h, w)
        clusters = cluster_logits(momentum.features, self.momentum_head.weights, cpsl.temperature)  # log P_SL + c
        labels, _ = rectify_pseudo_labels(soft_labels, clusters.softmax(dim=1))  # Eq. 1
        image_distributions = image_class_distribution(labels, soft_labels.shape[1])  # delta_n (b, K), Eq. 8
        self.state.class_distribution.copy_(update_class_distribution(
            self.state.class_distribution, image_distributions, cpsl.distribution_momentum))  # Eq. 11
        generator = torch.Generator().manual_seed(self.settings.training.seed * 1_000_003 + iteration)  # resumable
        indices = [class_balanced_sample(image.flatten(), cpsl.samples_per_image, generator)
                   for image in labels]  # Eq. 9
        features = pixel_rows(F.normalize(momentum.features, dim=1), indices)  # (M, D)
        outputs = output_rows(momentum.logits, indices)  # (M, K)
        head = self.head.weights.detach()  # Eq. 6 scores with f_SL itself (public code :260-267, self.prototypes)
        memory, memory_outputs = self.state.features(), self.state.outputs()
        memory_scores = None if memory is None else self_labeling_scores(memory, head)
        distribution = self.state.class_distribution
        feature_targets = online_assignments(self_labeling_scores(features, head), memory_scores, distribution,
                                             cpsl.epsilon, cpsl.sinkhorn_iterations)  # Eq. 6, 12
        output_targets = online_assignments(outputs, memory_outputs, distribution, cpsl.epsilon,
                                            cpsl.sinkhorn_iterations)  # public code :279-293
        self.state.push(features, outputs)
        return labels, clusters, features, (feature_targets, output_targets)


def cpsl_train(inputs: CpslInputs, paths: RunPaths, settings: CpslTrainSettings, device: torch.device,
               run_settings: dict[str, Any], world_size: int = 1) -> None:
    """Train and write the checkpoint and loss log; resumable from ``paths.state``. One process only."""
    launch_one_process(_cpsl_train, (inputs, paths, settings, run_settings), settings.training, device, world_size,
                       "CPSL", "its memory bank is")


def _cpsl_train(context: DistributedContext, job: tuple[CpslInputs, RunPaths, CpslTrainSettings,
                                                          dict[str, Any]]) -> None:
    inputs, paths, settings, run_settings = job
    model, class_names = seeded_start(inputs.warmup_checkpoint, settings.training.seed, context.device)
    warmup = make_teacher(model)  # a frozen copy: the fixed P_ST
    momentum = make_teacher(model)  # f'_SEG
    weights, distribution = initial_head_and_distribution(warmup, inputs.target_manifest, len(class_names),
                                                          context.device)
    head = SelfLabelingHead(weights).to(context.device)
    momentum_head = make_teacher(head)  # f'_SL
    state = SelfLabelingState(distribution, settings.cpsl.memory_length, weights.shape[1]).to(context.device)
    optimizer = make_optimizer(model, settings.training.optimizer)
    optimizer.add_param_group({"params": list(head.parameters()),
                               "lr_scale": settings.training.optimizer.head_lr_multiplier})
    modules = {"model": model, "optimizer": optimizer, "teacher": momentum, "head": head,
               "momentum_head": momentum_head, "self_labeling": state}
    logger.info("CPSL: epsilon %.3g, tau %.3g, lambda_1 %.3g, lambda_2 %.3g, delta_pseudo|_0 %s",
                settings.cpsl.epsilon, settings.cpsl.temperature, settings.cpsl.self_labeling_weight,
                settings.cpsl.consistency_weight, [round(share, 4) for share in distribution.tolist()])
    run = AdaptationRun(model, optimizer, modules, DomainData(inputs.source_manifest),
                        DomainData(inputs.target_manifest, labelled=False), settings.training, paths,
                        fingerprint(run_settings, input_signature(inputs)), class_names, run_settings)
    train_and_save(run, lambda network: CpslStep(network, head, momentum, momentum_head, warmup, state, optimizer,
                                                 settings, context), context)
