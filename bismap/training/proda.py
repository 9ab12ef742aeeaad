"""ProDA stage 1 (paper 001, Sec. 4.1-4.2) as a self-training variant, read top to bottom.

The computations are those of :mod:`bismap.methods.proda`; this module runs them
in the shared adaptation loop (:mod:`bismap.training.adaptation`). Per
iteration, one source and one target batch go through the student with the
target's strong view phi(x^t) (the BiSMAP strong view, Eq. 8's T'), and the loss
is ProDA Eq. 11::

    L = L_ce(x^s)                      source cross-entropy
      + L_sce(x^t, y^)                 SCE on the denoised labels          (Eq. 7)
      + gamma_1 KL(z(x^t) || z(phi))   prototype assignments, weak || strong (Eq. 8-9), / K
      + gamma_2 L_reg(x^t)             -(1/K) sum_k log p_k                (Eq. 10)

The denoised label y^ = argmax_k(omega_k p_{t,0,k}) (Eq. 3) combines the FIXED
soft prediction p_{t,0} of the warmed-up model (a frozen copy, evaluated on the
same weak view: it equals the stored soft labels of the public code without
writing them) with the prototype weights omega of the momentum encoder's
features (Eq. 4). The prototypes start as the class centroids of the warmup's
target-train features under its own labels (as ProDA's initialisation pass
does) and follow Eq. 6 after each step as the public code updates them: one
momentum step per image and class, with the momentum encoder's features and
its own argmax labels. They are part of the resume state. One process only:
the prototype update is not synchronised across processes yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bismap.data.strong_augment import StrongAugmentSettings
from bismap.methods.proda import (ProdaSettings, prototype_weights, pseudo_label_loss_pixels,
                                  rectify_pseudo_labels, regularization_pixels, structure_kl_pixels,
                                  update_prototypes)
from bismap.methods.prototypes import centroids_from_sums
from bismap.models.deeplab import SegmentationOutput
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

# Eq. 6 per image: the public code skips a class with < 10 pixels in an image (models/adaptation_modelv2.py:133),
# on the full 2048 x 1024 image at 1/4 resolution (512 x 256 positions: 10 is 0.008%); on the digit scenes' 8 x 8
# feature maps 10 pixels would be 16% of the image, so any pixel of a class counts here.
PROTOTYPE_MINIMUM_PIXELS = 1


@dataclass(frozen=True)
class ProdaTrainSettings:
    training: TrainSettings
    proda: ProdaSettings = field(default_factory=ProdaSettings)
    strong_augment: StrongAugmentSettings = field(default_factory=StrongAugmentSettings)


ProdaInputs = WarmupInputs  # the initial student, the momentum encoder and the fixed p_{t,0}


class PrototypeBank(torch.nn.Module):
    """The class prototypes eta (K, D) as a buffer, so that the resume state holds them."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.clone())


def initial_prototypes(model: torch.nn.Module, manifest_path: Path, num_classes: int,
                       device: torch.device) -> torch.Tensor:
    """Class centroids (K, D) of the model's target features under its own argmax labels; NaN rows: never predicted."""
    return centroids_from_sums(*own_label_class_sums(model, manifest_path, num_classes, device))


class ProdaStep:
    """ProDA Eq. 11 and one SGD step; updates the momentum encoder and the prototypes (one process)."""

    def __init__(self, network: torch.nn.Module, momentum: torch.nn.Module, warmup: torch.nn.Module,
                 bank: PrototypeBank, optimizer: torch.optim.Optimizer, settings: ProdaTrainSettings,
                 context: DistributedContext | None = None) -> None:
        self.network, self.momentum, self.warmup, self.bank = network, momentum, warmup, bank
        self.optimizer, self.settings = optimizer, settings
        self.context = context or DistributedContext()
        self.device = self.context.device

    def __call__(self, source: Batch, target: Batch, iteration: int) -> dict[str, torch.Tensor]:
        proda = self.settings.proda
        source_images = source["image"].to(self.device)  # (b, 3, H, W)
        target_images = target["image"].to(self.device)  # (b, 3, H, W)
        logits, features, geometry = three_view_forward(self.network, source_images, target_images,
                                                        self.settings.strong_augment, self.settings.training.seed,
                                                        iteration, self.context)  # each (b, K|D, h, w)
        strong_features = features[2]  # (b, D, h, w)
        labels, momentum_output = self._denoised_labels(target_images)  # (b, h, w); f~ (b, D, h, w), logits
        valid = geometry.valid(tuple(strong_features.shape[-2:]))  # (b, h, w)
        terms = {"source_ce": image_cross_entropy(logits[0], source["label"].to(self.device), self.context),
                 "target_sce": pixel_mean(pseudo_label_loss_pixels(logits[1], labels, proda), self.context),
                 "structure_kl": pixel_mean(structure_kl_pixels(geometry.warp(momentum_output.features),
                                                                strong_features, self.bank.prototypes,
                                                                proda.temperature, valid), self.context),
                 "regularization": pixel_mean(regularization_pixels(logits[1]), self.context)}
        loss = terms["source_ce"] + terms["target_sce"] + proda.kl_weight * terms["structure_kl"] \
            + proda.regularization_weight * terms["regularization"]  # Eq. 11
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # Eq. 6 after the step, as the public code (models/adaptation_modelv2.py:256-259): Eq. 4 and Eq. 8
        # above used the same prototypes; the update takes the momentum encoder's own argmax labels
        self.bank.prototypes.copy_(update_prototypes(self.bank.prototypes, momentum_output.features,
                                                     momentum_output.logits.argmax(dim=1), proda.prototype_momentum,
                                                     PROTOTYPE_MINIMUM_PIXELS))
        update_ema(self.momentum, unwrap_model(self.network), proda.ema_decay)
        return {"loss": loss, **terms}

    @torch.no_grad()
    def _denoised_labels(self, images: torch.Tensor) -> tuple[torch.Tensor, SegmentationOutput]:
        """Eq. 3-4 on the weak view: labels (b, h, w) and the momentum encoder's output (features, logits)."""
        proda = self.settings.proda
        momentum_output = self.momentum(images)  # f~: features (b, D, h, w), logits (b, K, h, w)
        soft_labels = self.warmup(images).logits.softmax(dim=1)  # p_{t,0} (b, K, h, w)
        weights = prototype_weights(momentum_output.features, self.bank.prototypes, proda.temperature)  # Eq. 4
        labels, _ = rectify_pseudo_labels(soft_labels, weights, proda.confidence_threshold)  # Eq. 3
        return labels, momentum_output


def proda_train(inputs: ProdaInputs, paths: RunPaths, settings: ProdaTrainSettings, device: torch.device,
                run_settings: dict[str, Any], world_size: int = 1) -> None:
    """Train and write the checkpoint and loss log; resumable from ``paths.state``. One process only."""
    launch_one_process(_proda_train, (inputs, paths, settings, run_settings), settings.training, device, world_size,
                       "ProDA", "its prototype update is")


def _proda_train(context: DistributedContext, job: tuple[ProdaInputs, RunPaths, ProdaTrainSettings,
                                                           dict[str, Any]]) -> None:
    inputs, paths, settings, run_settings = job
    model, class_names = seeded_start(inputs.warmup_checkpoint, settings.training.seed, context.device)
    warmup = make_teacher(model)  # a frozen copy: the fixed soft labels p_{t,0}
    momentum = make_teacher(model)  # f~, the momentum encoder
    bank = PrototypeBank(initial_prototypes(warmup, inputs.target_manifest, len(class_names), context.device))
    optimizer = make_optimizer(model, settings.training.optimizer)
    modules = {"model": model, "optimizer": optimizer, "teacher": momentum, "prototypes": bank}
    source = DomainData(inputs.source_manifest)
    target = DomainData(inputs.target_manifest, labelled=False)
    logger.info("ProDA: tau %.3g, gamma_1 %.3g, gamma_2 %.3g, prototypes of %d classes", settings.proda.temperature,
                settings.proda.kl_weight, settings.proda.regularization_weight,
                int((~bank.prototypes.isnan().any(dim=1)).sum()))
    run = AdaptationRun(model, optimizer, modules, source, target, settings.training, paths,
                        fingerprint(run_settings, input_signature(inputs)), class_names, run_settings)
    train_and_save(run, lambda network: ProdaStep(network, momentum, warmup, bank, optimizer, settings, context),
                   context)
