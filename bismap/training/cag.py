"""CAG-UDA's first stage (paper 004, Sec. 3.2-3.4, Eq. 12) as a self-training variant, read top to bottom.

The computations are those of :mod:`bismap.methods.cag`. The category anchors
(Eq. 4) are the source class centroids of the warmup's decoder features that
the MAPs stage stores (``maps/prototypes.h5``, ``ClassPrototypes.centroids``);
the active target labels (Eq. 5-7) are the ``cas`` pseudo-label files made with
them and the margin Delta_d. Per iteration the loss is Eq. 12::

    L = L^s_ce + lambda_1 (L^s_dis + L^t_dis) + lambda_2 (L^t_ce + L^tP_ce)

with the anchor distance of source pixels (ground truth, Eq. 8) and of active
target pixels (their anchor labels, Eq. 10), normalised as the public code
does (``bismap.methods.cag.anchor_distance_pairs``), the cross-entropy on the
anchor labels (Eq. 9) and on the predictions of softmax > P_0 (Eq. 11) of a
frozen copy of the model the stage starts from, on the current target batch
(the public code's PredNet; Sec. 3.4 fixes the labels within a stage). On a
resume the copy is made again from the stage's start checkpoint.
One call trains one stage of Algorithm 1. The stages are the variant's
``rounds`` (rules/selftrain.smk): stage s + 1 starts from stage s's model,
with anchors and anchor labels that model recomputes (the paper computes both
at the start of each stage and keeps them fixed within it). The anchors are
the class centroids of the source pixels the stage's model classifies
correctly (the MAPs feature sample); Eq. 4 averages all source pixels of a class.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bismap.io import shard_png_paths
from bismap.labels.gmm import ClassPrototypes
from bismap.losses import weighted_cross_entropy_pixels
from bismap.methods.cag import CagSettings, anchor_distance_pairs, probability_pseudo_labels
from bismap.methods.prototypes import labels_at_feature_size
from bismap.training.adaptation import (AdaptationRun, Batch, DomainData, image_cross_entropy, pixel_mean,
                                        seeded_start, train_and_save)
from bismap.training.checkpoint import fingerprint, input_signature
from bismap.training.distributed import DistributedContext, launch_training
from bismap.training.optim import make_optimizer
from bismap.training.supervised import RunPaths, TrainSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CagTrainSettings:
    training: TrainSettings
    cag: CagSettings = field(default_factory=CagSettings)


@dataclass(frozen=True)
class CagInputs:
    warmup_checkpoint: Path
    prototypes: Path  # the MAPs file: its centroids are the anchors
    source_manifest: Path
    target_manifest: Path
    anchor_label_dirs: list[Path]  # shard folders of the 'cas' labels (Eq. 5-7)


def load_anchors(path: Path, class_names: list[str], device: torch.device) -> torch.Tensor:
    """The category anchors (K, D) float32 of a prototypes file, refused without centroids or for other classes."""
    prototypes = ClassPrototypes.load(path, device)
    if list(prototypes.class_names) != class_names or prototypes.centroids is None:
        raise ValueError(f"{path} holds no class centroids for the classes {class_names}")
    return prototypes.centroids.float()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The stage's initial model, frozen: a deep copy in eval mode without gradients (public code: PredNet,
    models/adaptation_model.py:146-155, loaded from the stage's start checkpoint ``Pred_resume``)."""
    frozen = copy.deepcopy(model).eval()
    return frozen.requires_grad_(False)


class CagStep:
    """CAG-UDA Eq. 12 and one SGD step on this rank's slice (b = B / N images per domain).

    ``labeller`` is the frozen model the stage starts from; it gives the
    probability-based labels of Eq. 11 on the current target batch (public
    code: models/adaptation_model.py:268-273, PredNet; per-iteration labels of
    the live model are what Sec. 3.4 reports as unstable).
    """

    def __init__(self, network: torch.nn.Module, labeller: torch.nn.Module, anchors: torch.Tensor,
                 optimizer: torch.optim.Optimizer, settings: CagSettings,
                 context: DistributedContext | None = None) -> None:
        self.network, self.labeller, self.anchors = network, labeller, anchors
        self.optimizer, self.settings = optimizer, settings
        self.context = context or DistributedContext()
        self.device = self.context.device

    def __call__(self, source: Batch, target: Batch, iteration: int) -> dict[str, torch.Tensor]:
        source_images = source["image"].to(self.device)  # (b, 3, H, W)
        target_images = target["image"].to(self.device)  # (b, 3, H, W)
        output = self.network(torch.cat([source_images, target_images]))
        logits = output.logits.split(len(source_images))  # each (b, K, h, w)
        features = output.features.split(len(source_images))  # each (b, D, h, w)
        source_labels = source["label"].to(self.device)  # (b, H, W)
        anchor_labels = target["label"].to(self.device)  # (b, H, W), active pixels only
        size = tuple(features[0].shape[-2:])
        with torch.no_grad():
            probability_labels, _ = probability_pseudo_labels(self.labeller(target_images).logits,
                                                              self.settings.probability_threshold)  # (b, h, w)
        terms = {"source_ce": image_cross_entropy(logits[0], source_labels, self.context),
                 "source_distance": self._distance(features[0], labels_at_feature_size(source_labels, size),
                                                   logits[0]),
                 "target_distance": self._distance(features[1], labels_at_feature_size(anchor_labels, size),
                                                   logits[1]),
                 "target_ce": image_cross_entropy(logits[1], anchor_labels, self.context),
                 "probability_ce": pixel_mean(weighted_cross_entropy_pixels(logits[1], probability_labels),
                                              self.context)}
        loss = terms["source_ce"] + self.settings.distance_weight * (terms["source_distance"]
                                                                     + terms["target_distance"]) \
            + self.settings.cross_entropy_weight * (terms["target_ce"] + terms["probability_ce"])  # Eq. 12
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss, **terms}

    def _distance(self, features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Eq. 8 / 10, the mean over the (image, class) pairs of the global batch."""
        return pixel_mean(anchor_distance_pairs(features, labels, logits, self.anchors), self.context)


def cag_train(inputs: CagInputs, paths: RunPaths, settings: CagTrainSettings, device: torch.device,
              run_settings: dict[str, Any], world_size: int = 1) -> None:
    """Train and write the checkpoint and loss log; resumable from ``paths.state`` (with any ``world_size``)."""
    launch_training(_cag_train, (inputs, paths, settings, run_settings), settings.training.batch_size, device,
                    world_size)


def _cag_train(context: DistributedContext, job: tuple[CagInputs, RunPaths, CagTrainSettings,
                                                         dict[str, Any]]) -> None:
    inputs, paths, settings, run_settings = job
    model, class_names = seeded_start(inputs.warmup_checkpoint, settings.training.seed, context.device)
    labeller = frozen_copy(model)  # the stage's start model; copied before a resume restores the student
    anchors = load_anchors(inputs.prototypes, class_names, context.device)  # (K, D), fixed in the stage
    optimizer = make_optimizer(model, settings.training.optimizer)
    source = DomainData(inputs.source_manifest)
    target = DomainData(inputs.target_manifest,
                        label_paths=shard_png_paths(inputs.anchor_label_dirs, "anchor label"))
    logger.info("CAG-UDA stage 1: margin %.3g, lambda_1 %.3g, lambda_2 %.3g, P_0 %.3g", settings.cag.margin,
                settings.cag.distance_weight, settings.cag.cross_entropy_weight, settings.cag.probability_threshold)
    run = AdaptationRun(model, optimizer, {"model": model, "optimizer": optimizer}, source, target,
                        settings.training, paths, fingerprint(run_settings, input_signature(inputs)),
                        class_names, run_settings)
    train_and_save(run, lambda network: CagStep(network, labeller, anchors, optimizer, settings.cag, context),
                   context)
