"""Bi-directional contrastive adaptation (paper 003, Sec. 3.2-3.4, Eq. 11-12) as a variant, read top to bottom.

The computations are those of :mod:`bismap.methods.contrastive`. Per
iteration one source and one target batch go through the network together,
and with features f_S, f_T (b, D, h, w)::

    rho_S      = class centroids of f_S under y_S                          (Eq. 1)
    mu_S, mu_T = momentum prototypes of each domain                        (Eq. 4-5)
    y_D        = class of the most similar calibrated prototype
                 rho_S + mu_T - mu_S where that cosine > T                 (Eq. 6-9)
    y_T        = y_D where it exists, else the static label y_F            (Eq. 10; label_priority)
    rho_T      = class centroids of f_T under y_T                          (Eq. 1)
    L = l^S_seg CE(x_S, y_S) + l^T_seg CE(x_T, y_F) + l^S_ent H(x_S) + l^T_ent H(x_T)   (Eq. 11)
      + l_FC FCL(f_T, y_T; rho_S) + l_BC BCL(f_S, y_S; rho_T)                           (Eq. 2-3, 12)

The segmentation and entropy terms are taken on logits upsampled to the image
(``loss_resolution`` "image", as the public code), the contrastive terms on the
(h, w) feature cells.

``label_priority`` "static" takes y_F first, "static_only" y_F alone (what
the public code's contrastive terms use). ``absent_class_similarity`` and
``entropy_form`` follow :mod:`bismap.methods.contrastive`.

The target segmentation loss learns from the static labels y_F and the hybrid
labels y_T enter the contrastive terms: the paper builds y_T "for the
bi-directional contrastive learning" (Fig. 2, Sec. 3.3) and its baseline's
L^T_seg is on the static labels (Sec. 4.2); it does not say that L^T_seg
changes. On the development seed, L^T_seg on y_T fell to 18.4 mIoU from a
44.4 warmup: the dense dynamic labels (97% of the pixels) then train the
classifier on its own nearest-prototype guesses.

The static labels y_F are pseudo-label files made by the warmup (the
``baseline`` label set: softmax confidence, standing in for CBST [58]); as the
paper, the run renews them every ``static_label_interval`` iterations with the
model it is training (``bismap.training.static_labels``). With
``prototype_scope`` "pair" (the paper's and the public code's pairs) source
image i and target image i make a pair with their own prototypes; "batch"
makes one pair of the whole batch. With ``prototype_gradient`` (the public
code) the contrastive terms also move the features through the prototypes;
without it prototypes are constants. mu_S and mu_T are in the resume state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bismap.data.samples import IGNORE_INDEX
from bismap.io import shard_png_paths
from bismap.labels.strategies import PseudoLabelSettings
from bismap.losses import PixelLosses, weighted_cross_entropy_pixels
from bismap.methods.contrastive import (ContrastiveSettings, backward_contrastive_pixels, calibrated_prototypes,
                                        dynamic_pseudo_labels, entropy_pixels, forward_contrastive_pixels,
                                        hybrid_pseudo_labels)
from bismap.methods.prototypes import absent_classes, class_centroids, labels_at_feature_size, momentum_update
from bismap.training.adaptation import (AdaptationRun, Batch, DomainData, image_cross_entropy, launch_one_process,
                                        pixel_mean, seeded_start, train_and_save, upsample_to)
from bismap.training.checkpoint import fingerprint, input_signature
from bismap.training.distributed import DistributedContext
from bismap.training.optim import make_optimizer
from bismap.training.static_labels import remove_renewals, renewal_folder, renewing_batches
from bismap.training.supervised import RunPaths, TrainSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContrastiveTrainSettings:
    training: TrainSettings
    contrastive: ContrastiveSettings = field(default_factory=ContrastiveSettings)
    # the strategy of the static labels y_F (the baseline label set), with which the run renews them
    baseline_pseudo_labels: PseudoLabelSettings = field(
        default_factory=lambda: PseudoLabelSettings(strategy="confidence", confidence=0.9))


@dataclass(frozen=True)
class ContrastiveInputs:
    warmup_checkpoint: Path
    source_manifest: Path
    target_manifest: Path
    static_label_dirs: list[Path]  # shard folders of the static labels y_F


class DomainPrototypes(torch.nn.Module):
    """mu_S and mu_T (K, D), NaN rows until a class is first seen, as buffers for the resume state."""

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.register_buffer("source", torch.full((num_classes, feature_dim), torch.nan))
        self.register_buffer("target", torch.full((num_classes, feature_dim), torch.nan))


class ContrastiveStep:
    """Eq. 12 and one SGD step; updates mu_S and mu_T (one process)."""

    def __init__(self, network: torch.nn.Module, momentum: DomainPrototypes, optimizer: torch.optim.Optimizer,
                 settings: ContrastiveSettings, context: DistributedContext | None = None) -> None:
        self.network, self.momentum, self.optimizer, self.settings = network, momentum, optimizer, settings
        self.context = context or DistributedContext()
        self.device = self.context.device

    def __call__(self, source: Batch, target: Batch, iteration: int) -> dict[str, torch.Tensor]:
        settings = self.settings
        source_images = source["image"].to(self.device)  # (b, 3, H, W)
        output = self.network(torch.cat([source_images, target["image"].to(self.device)]))
        logits = output.logits.split(len(source_images))  # each (b, K, h, w)
        source_features, target_features = output.features.split(len(source_images))  # each (b, D, h, w)
        source_labels = source["label"].to(self.device)  # (b, H, W)
        static_image = target["label"].to(self.device)  # y_F (b, H, W)
        size = tuple(source_features.shape[-2:])
        source_small = labels_at_feature_size(source_labels, size)  # y_S (b, h, w)
        static = labels_at_feature_size(static_image, size)  # y_F (b, h, w)
        forward, backward, dynamic_share = self._contrastive_terms(source_features, source_small, target_features,
                                                                   static)  # Eq. 1-10
        source_logits, target_logits, target_labels = self._segmentation_inputs(logits, static_image, static)
        terms = {"source_ce": image_cross_entropy(logits[0], source_labels, self.context),
                 "target_ce": pixel_mean(weighted_cross_entropy_pixels(target_logits, target_labels), self.context),
                 "source_entropy": pixel_mean(entropy_pixels(source_logits, form=settings.entropy_form), self.context),
                 "target_entropy": pixel_mean(entropy_pixels(target_logits, form=settings.entropy_form), self.context),
                 "forward_contrast": forward, "backward_contrast": backward}
        loss = settings.source_segmentation_weight * terms["source_ce"] \
            + settings.target_segmentation_weight * terms["target_ce"] \
            + settings.source_entropy_weight * terms["source_entropy"] \
            + settings.target_entropy_weight * terms["target_entropy"] \
            + settings.forward_weight * terms["forward_contrast"] \
            + settings.backward_weight * terms["backward_contrast"]  # Eq. 11-12
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss, **terms, "dynamic_share": dynamic_share}

    def _segmentation_inputs(self, logits: tuple[torch.Tensor, ...], static_image: torch.Tensor,
                             static: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source and target logits and y_F for Eq. 11's target CE and entropies, at ``loss_resolution``.

        "image" upsamples the (b, K, h, w) logits to the (b, H, W) labels as the public code; "feature" keeps
        them at (h, w) with the nearest-downsampled y_F (releases up to 0.3.1; the source CE is at image size
        either way).
        """
        if self.settings.loss_resolution == "feature":
            return logits[0], logits[1], static
        return upsample_to(logits[0], static_image), upsample_to(logits[1], static_image), static_image

    def _contrast(self, pixels_function: Callable[..., PixelLosses], features: torch.Tensor, labels: torch.Tensor,
                  prototypes: torch.Tensor) -> torch.Tensor:
        """Eq. 2 or 3 over the global batch; 0 when the other domain has no prototype at all (no labelled pixel)."""
        if bool(absent_classes(prototypes).all()):
            return features.sum() * 0.0
        settings = self.settings
        return pixel_mean(pixels_function(features, labels, prototypes, settings.temperature,
                                          settings.absent_class_similarity), self.context)

    def _contrastive_terms(self, source_features: torch.Tensor, source_labels: torch.Tensor,
                           target_features: torch.Tensor, static_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """FCL, BCL (Eq. 2-3) and the share of target pixels with a dynamic label; updates mu_S, mu_T (Eq. 4-5).

        ``prototype_scope`` "pair": image i of each domain makes a pair with
        its own prototypes, and each term is the mean over the pairs of their
        pixel means (public code: damnet_trainer.py:143-147); "batch": one
        pair made of the whole batch. mu_S and mu_T take the batch centroids
        once per iteration either way.
        """
        settings, num_classes = self.settings, self.momentum.source.shape[0]
        self.momentum.source.copy_(momentum_update(
            self.momentum.source, class_centroids(source_features.detach(), source_labels, num_classes),
            settings.prototype_momentum))  # Eq. 4
        groups = [slice(index, index + 1) for index in range(len(source_features))] \
            if settings.prototype_scope == "pair" else [slice(None)]
        forward, backward, dynamic, hybrid = [], [], [], []
        for group in groups:
            source_prototypes = self._prototypes(source_features[group], source_labels[group])  # rho_S, Eq. 1
            dynamic_labels, hybrid_labels = self._pseudo_labels(source_prototypes.detach(),
                                                                target_features[group].detach(),
                                                                static_labels[group])  # y_D, y_T (1 or b, h, w)
            target_prototypes = self._prototypes(target_features[group], hybrid_labels)  # rho_T, Eq. 1
            forward.append(self._contrast(forward_contrastive_pixels, target_features[group], hybrid_labels,
                                          source_prototypes))
            backward.append(self._contrast(backward_contrastive_pixels, source_features[group], source_labels[group],
                                           target_prototypes))
            dynamic.append(dynamic_labels)
            hybrid.append(hybrid_labels)
        self.momentum.target.copy_(momentum_update(
            self.momentum.target, class_centroids(target_features.detach(), torch.cat(hybrid), num_classes),
            settings.prototype_momentum))  # Eq. 5
        share = (torch.cat(dynamic) != IGNORE_INDEX).double().mean()
        return torch.stack(forward).mean(), torch.stack(backward).mean(), share

    def _prototypes(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 1 (K, D); detached unless ``prototype_gradient`` (public code: damnet_trainer.py:58, 98 keep it)."""
        if not self.settings.prototype_gradient:
            features = features.detach()
        return class_centroids(features, labels, self.momentum.source.shape[0])

    @torch.no_grad()
    def _pseudo_labels(self, source_prototypes: torch.Tensor, target_features: torch.Tensor,
                       static_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6-10: the dynamic labels y_D and the hybrid labels y_T, each (b, h, w)."""
        settings = self.settings
        calibrated = calibrated_prototypes(source_prototypes, self.momentum.source, self.momentum.target)  # Eq. 6-7
        dynamic, _ = dynamic_pseudo_labels(target_features, calibrated, settings.similarity_threshold)  # Eq. 8-9
        return dynamic, hybrid_pseudo_labels(dynamic, static_labels, settings.label_priority)  # Eq. 10


def contrastive_train(inputs: ContrastiveInputs, paths: RunPaths, settings: ContrastiveTrainSettings,
                      device: torch.device, run_settings: dict[str, Any], world_size: int = 1) -> None:
    """Train and write the checkpoint and loss log; resumable from ``paths.state``. One process only."""
    launch_one_process(_contrastive_train, (inputs, paths, settings, run_settings), settings.training, device,
                       world_size, "the contrastive method", "its momentum prototypes are")


def _contrastive_train(context: DistributedContext, job: tuple[ContrastiveInputs, RunPaths,
                                                                 ContrastiveTrainSettings, dict[str, Any]]) -> None:
    inputs, paths, settings, run_settings = job
    model, class_names = seeded_start(inputs.warmup_checkpoint, settings.training.seed, context.device)
    momentum = DomainPrototypes(len(class_names), model.settings.feature_dim).to(context.device)
    optimizer = make_optimizer(model, settings.training.optimizer)
    target = DomainData(inputs.target_manifest,
                        label_paths=shard_png_paths(inputs.static_label_dirs, "static label"))
    logger.info("bi-directional contrastive: tau %.3g, lambda_FC %.3g, lambda_BC %.3g, T %.3g, momentum %.4g, "
                "labels %s first, absent-class similarity %s, entropy %s", settings.contrastive.temperature,
                settings.contrastive.forward_weight, settings.contrastive.backward_weight,
                settings.contrastive.similarity_threshold, settings.contrastive.prototype_momentum,
                settings.contrastive.label_priority, settings.contrastive.absent_class_similarity,
                settings.contrastive.entropy_form)
    run = AdaptationRun(model, optimizer, {"model": model, "optimizer": optimizer, "prototypes": momentum},
                        DomainData(inputs.source_manifest), target, settings.training, paths,
                        fingerprint(run_settings, input_signature(inputs)),
                        class_names, run_settings)
    folder = renewal_folder(paths.state)  # y_F renewed every static_label_interval iterations (Sec. 4.1)
    make_batches = renewing_batches(run, settings.baseline_pseudo_labels, settings.contrastive.static_label_interval,
                                    folder, context)
    train_and_save(run, lambda network: ContrastiveStep(network, momentum, optimizer, settings.contrastive, context),
                   context, make_batches)
    remove_renewals(folder)
