"""BiSMAP self-training (Sec. 3.5, Eq. 10-13), read top to bottom.

Per iteration, one source batch (with its transferability maps w^s) and one
target batch (with its pseudo-labels) go through the student together, so
BatchNorm sees both domains. The loss is Eq. 13::

    L = L_ce(x^s)            source cross-entropy weighted by w^s     (Eq. 10)
      + L_sce(x^t)           symmetric CE on the pseudo-labels        (Eq. 11)
      + lambda L_consist     KL(EMA teacher on x^t || student on phi(x^t))  (Eq. 12)

With ``align_teacher`` / ``balance_pseudo_labels`` (this project's additions,
:mod:`bismap.methods.alignment`), the teacher's targets of Eq. 12 are aligned to
the running source class distribution and the SCE pixels of Eq. 11 weighted by
class, against self-training's drift to the classes the warmup over-predicts.

Each term can be switched off for ablations (``use_stm`` drops w^s,
``use_pseudo_labels`` the SCE term, ``use_consistency`` the teacher). Reading
of Eq. 12: the EMA teacher sees the weakly augmented target image and the
student its strong view phi(x^t), as in the mean teacher [32] that Sec. 4.2
follows; the teacher's prediction is warped by phi's geometry.

With ``world_size`` N > 1 (as in :mod:`bismap.training.supervised`) each of N
processes takes its contiguous slice of both global batches, BatchNorm is
synchronised over the student's whole input cat(source, target, strong view),
and every term is a mean over the pixels of the global batch. The strong views
are drawn for the global batch from the (seed, iteration) generator exactly as
one process draws them, and each rank keeps its slice, so 1 and N processes see
the same views. The EMA teacher is updated on every rank from the same weights
(DDP's averaged gradients, synchronised BatchNorm statistics), so it stays the
same everywhere without communication. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bismap.data.loading import IMAGENET_MEAN, IMAGENET_STD
from bismap.data.photometric import load_statistics
from bismap.data.strong_augment import Geometry, StrongAugmentSettings, strong_augment
from bismap.io import shard_png_paths
from bismap.losses import kl_divergence_pixels, symmetric_cross_entropy_pixels
from bismap.methods.alignment import ClassDistributions, predicted_class_mass, shares
from bismap.methods.prototypes import class_pixel_counts
from bismap.models import ModelSettings, build_model
from bismap.training.adaptation import (AdaptationRun, Batch, DomainData, image_cross_entropy, pixel_mean,
                                        resize_maps, train_and_save, upsample_to)
from bismap.training.checkpoint import fingerprint, input_signature, load_model
from bismap.training.distributed import (DistributedContext, all_reduce_sum, convert_sync_batchnorm, launch_training,
                                         rank_slice, unwrap_model)
from bismap.training.ema import make_teacher, update_ema, use_batch_statistics
from bismap.training.optim import make_optimizer
from bismap.training.supervised import RunPaths, TrainSettings, seed_everything

logger = logging.getLogger(__name__)

INITS = ("warmup", "imagenet")


@dataclass(frozen=True)
class SelfTrainSettings:
    training: TrainSettings
    init: str = "warmup"  # start from the warmup checkpoint, or from ImageNet weights as the public code does
    ema_decay: float = 0.999  # Sec. 4.2
    # lambda of Eq. 13 (Sec. 4.2: 20) on KL(teacher || student) averaged over pixels AND classes, as the public code's
    # nn.KLDivLoss() (models/adaptation_model.py:178, commit 8789a0d): lambda / K per pixel of the class-summed KL
    consistency_weight: float = 20.0
    # lambda ramps up as exp(-5 (1 - t)^2), t = iteration / (consistency_rampup * iterations) clipped to 1 (public
    # code: 4,000 of 90,000 iterations, adaptation_model.py:315-321); 0 = lambda from the start
    consistency_rampup: float = 0.0
    # the EMA teacher normalises with the target batch's own BatchNorm statistics (public code: BaseNet_ema.train(),
    # adaptation_model.py:166), not with its running statistics
    teacher_batch_statistics: bool = False
    sce_alpha: float = 0.1  # Eq. 11
    sce_beta: float = 1.0
    use_stm: bool = True
    use_pseudo_labels: bool = True
    use_consistency: bool = True
    strong_augment: StrongAugmentSettings = field(default_factory=StrongAugmentSettings)
    # class-distribution alignment (bismap.methods.alignment; not in the paper), both need the teacher:
    align_teacher: bool = False  # Eq. 12's targets times pi_source / pi_predicted
    balance_pseudo_labels: bool = False  # Eq. 11's pixels weighted by min(cap, pi_source / pi_labels)
    alignment_momentum: float = 0.99  # of the running class distributions
    alignment_weight_cap: float = 5.0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"selftrain.init must be one of {INITS}, got '{self.init}'")
        if not 0.0 <= self.consistency_rampup <= 1.0:
            raise ValueError(f"selftrain.consistency_rampup must be in [0, 1], got {self.consistency_rampup}")
        if (self.align_teacher or self.balance_pseudo_labels) and not self.use_consistency:
            raise ValueError("selftrain: align_teacher and balance_pseudo_labels need use_consistency (the teacher "
                             "gives the predicted class distribution)")


@dataclass(frozen=True)
class SelfTrainInputs:
    initial_checkpoint: Path  # the warmup, or the previous round's model (selftrain.rounds)
    source_manifest: Path
    target_manifest: Path
    pseudo_label_dirs: list[Path]  # shard folders of <name>.png
    weight_dirs: list[Path] | None = None  # STM shard folders; needed with use_stm
    photometric_statistics: Path | None = None  # GPA of the source images
    imagenet_weights: Path | None = None  # with init 'imagenet'


@dataclass(frozen=True)
class _SelfTrainJob:
    """What every process needs to train (it is pickled to the child processes)."""

    inputs: SelfTrainInputs
    paths: RunPaths
    settings: SelfTrainSettings
    run_settings: dict[str, Any]


class SelfTrainStep:
    """The loss of Eq. 13 and one SGD step on this rank's slice (b = B / N images per domain); updates the teacher.

    ``network``: the student, DDP-wrapped with N > 1; ``teacher``: its EMA copy, or None
    without the consistency term.
    """

    def __init__(self, network: torch.nn.Module, teacher: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                 settings: SelfTrainSettings, context: DistributedContext | None = None,
                 distributions: ClassDistributions | None = None) -> None:
        self.network, self.teacher, self.optimizer, self.settings = network, teacher, optimizer, settings
        self.context = context or DistributedContext()
        self.device = self.context.device
        self.distributions = distributions  # running class distributions, with either alignment

    def __call__(self, source: Batch, target: Batch, iteration: int) -> dict[str, torch.Tensor]:
        source_images = source["image"].to(self.device)  # (b, 3, H, W)
        target_images = target["image"].to(self.device)  # (b, 3, H, W)
        inputs = [source_images, target_images]
        if self.teacher is not None:
            teacher_probabilities = self._teacher_probabilities(target_images)  # (b, K, h, w)
            self._update_distributions(source, target, teacher_probabilities)
            strong, geometry = self._strong_view(target_images, iteration)  # (b, 3, H, W), its warp
            inputs.append(strong)
        logits = self.network(torch.cat(inputs)).logits.split(len(source_images))  # each (b, K, H/4, W/4)
        terms = {"source_ce": self._source_loss(logits[0], source)}
        if self.settings.use_pseudo_labels:
            terms["target_sce"] = self._target_loss(logits[1], target)
        if self.teacher is not None:
            terms["consistency"] = self._consistency_loss(teacher_probabilities, logits[2], geometry)
        loss = terms["source_ce"] + terms.get("target_sce", 0.0)
        weight = self.settings.consistency_weight * consistency_rampup(iteration, self.settings)
        loss = loss + weight * terms.get("consistency", 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # with N > 1, DDP averages the gradients: every rank steps to the same weights
        self.optimizer.step()
        if self.teacher is not None:  # same weights and (synchronised) BN statistics: the same teacher everywhere
            update_ema(self.teacher, unwrap_model(self.network), self.settings.ema_decay)
        return {"loss": loss, **terms}

    def _strong_view(self, images: torch.Tensor, iteration: int) -> tuple[torch.Tensor, Geometry]:
        return strong_view(images, self.settings.strong_augment, self.settings.training.seed, iteration, self.context)

    def _source_loss(self, logits: torch.Tensor, source: Batch) -> torch.Tensor:
        labels = source["label"].to(self.device)  # (b, H, W)
        weights = source["weight"].to(self.device) if self.settings.use_stm else None  # (b, H, W), Eq. 9
        return image_cross_entropy(logits, labels, self.context, weights)  # Eq. 10

    def _target_loss(self, logits: torch.Tensor, target: Batch) -> torch.Tensor:
        labels = target["label"].to(self.device)  # (b, H, W) pseudo-labels, 255 = ignore
        values, labelled = symmetric_cross_entropy_pixels(upsample_to(logits, labels), labels,
                                                          self.settings.sce_alpha, self.settings.sce_beta)  # Eq. 11
        if self.settings.balance_pseudo_labels:  # a weighted mean: over-labelled classes count less
            return pixel_mean((values, self.distributions.label_weights(labels)), self.context)
        return pixel_mean((values, labelled), self.context)

    @torch.no_grad()
    def _teacher_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).logits.softmax(dim=1)  # (b, K, h, w)

    @torch.no_grad()
    def _update_distributions(self, source: Batch, target: Batch, teacher_probabilities: torch.Tensor) -> None:
        """This global batch's class shares of source labels, teacher predictions and pseudo-labels, into the EMAs."""
        if self.distributions is None:
            return
        classes = teacher_probabilities.shape[1]
        source_counts, mass, target_counts = (
            all_reduce_sum(count, self.context)  # (K,) each: sums over the ranks, then divided
            for count in (class_pixel_counts(source["label"].to(self.device), classes),
                          predicted_class_mass(teacher_probabilities),
                          class_pixel_counts(target["label"].to(self.device), classes)))
        pixels = all_reduce_sum(torch.tensor(teacher_probabilities[:, 0].numel(), dtype=torch.float64,
                                             device=mass.device), self.context)  # b * h * w, over the ranks
        self.distributions.update(shares(source_counts), mass / pixels, shares(target_counts))

    def _consistency_loss(self, teacher_probabilities: torch.Tensor, student_logits: torch.Tensor,
                          geometry: Geometry) -> torch.Tensor:
        """Eq. 12 at image resolution, as the public code: the teacher's map is moved by phi's geometry, and
        pixels from outside the image or hidden by Cutout do not count; the KL is averaged over classes too."""
        if self.settings.align_teacher:
            teacher_probabilities = self.distributions.align(teacher_probabilities)
        size = tuple(geometry.hidden.shape[-2:]) if geometry.hidden is not None else tuple(student_logits.shape[-2:])
        warped = resize_maps(geometry.warp(teacher_probabilities), size)  # (b, K, H, W), still distributions
        student = resize_maps(student_logits, size)  # (b, K, H, W)
        values, visible = kl_divergence_pixels(warped.clamp_min(1e-8).log(), student, geometry.visible(size))
        return pixel_mean((values / student.shape[1], visible), self.context)  # mean over classes: nn.KLDivLoss()


def consistency_rampup(iteration: int, settings: SelfTrainSettings) -> float:
    """exp(-5 (1 - t)^2), t = iteration / ramp length clipped to [0, 1]: the public code's ramp of lambda (Eq. 13)."""
    length = settings.consistency_rampup * settings.training.iterations
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(iteration, 0), length) / length
    return math.exp(-5.0 * phase * phase)


def strong_view(images: torch.Tensor, settings: StrongAugmentSettings, seed: int, iteration: int,
                context: DistributedContext) -> tuple[torch.Tensor, Geometry]:
    """phi of this rank's images (b, 3, H, W): drawn for the global batch as one process does, then sliced.

    The generator depends on (seed, iteration) only and draws image after image, so
    rank r's views are those of images r*b..(r+1)*b-1 of a 1-process run. Every rank
    augments all B images (the draws are inside ``strong_augment``): small next to the network.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    strong, geometry = strong_augment(_global_batch(images, context), settings, generator,
                                      IMAGENET_MEAN, IMAGENET_STD)  # (B, 3, H, W)
    return rank_slice(strong, context), Geometry(rank_slice(geometry.theta, context),
                                                 rank_slice(geometry.hidden, context))


def three_view_forward(network: torch.nn.Module, source_images: torch.Tensor, target_images: torch.Tensor,
                       settings: StrongAugmentSettings, seed: int, iteration: int,
                       context: DistributedContext) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...],
                                                             Geometry]:
    """One forward of cat(source, target, strong view of target), as ProDA and CPSL train.

    Returns the logits (b, K, h, w) and features (b, D, h, w) of each view in that
    order, and the strong view's geometry.
    """
    strong, geometry = strong_view(target_images, settings, seed, iteration, context)
    output = network(torch.cat([source_images, target_images, strong]))
    return output.logits.split(len(source_images)), output.features.split(len(source_images)), geometry


def _global_batch(local: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Every rank's slice (b, ...) concatenated in rank order: the global batch (B, ...); ``local`` for N == 1."""
    if not context.distributed:
        return local
    slices = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(slices, local.contiguous())
    return torch.cat(slices)


def _initial_model(inputs: SelfTrainInputs, settings: SelfTrainSettings,
                   device: torch.device) -> tuple[torch.nn.Module, ModelSettings, list[str]]:
    model, checkpoint = load_model(inputs.initial_checkpoint, device)
    model_settings = model.settings
    if settings.init == "imagenet":
        model = build_model(model_settings, len(checkpoint["class_names"]), inputs.imagenet_weights).to(device)
    return model, model_settings, list(checkpoint["class_names"])


def domains(inputs: SelfTrainInputs, use_weights: bool) -> tuple[DomainData, DomainData]:
    """Source (GPA-stylized, with transferability maps) and target (pseudo-labels) data."""
    if use_weights and not inputs.weight_dirs:
        raise ValueError("use_stm is on but no transferability maps were given")
    photometric = load_statistics(inputs.photometric_statistics) if inputs.photometric_statistics else None
    source = DomainData(inputs.source_manifest, photometric_statistics=photometric,
                        weight_paths=shard_png_paths(inputs.weight_dirs, "weight map") if use_weights else None)
    target = DomainData(inputs.target_manifest, label_paths=shard_png_paths(inputs.pseudo_label_dirs, "pseudo-label"))
    return source, target


def self_train(inputs: SelfTrainInputs, paths: RunPaths, settings: SelfTrainSettings, device: torch.device,
               run_settings: dict[str, Any], world_size: int = 1) -> None:
    """Train and write the checkpoint and loss log; resumable from ``paths.state`` (with any ``world_size``).

    ``device``: what ``acquire_devices(world_size)`` yielded; ``world_size`` > 1 trains in that
    many processes, one per acquired GPU (or CPU processes with gloo when there is no CUDA).
    """
    launch_training(_self_train, _SelfTrainJob(inputs, paths, settings, run_settings), settings.training.batch_size,
                    device, world_size)


def _self_train(context: DistributedContext, job: _SelfTrainJob) -> None:
    """One process's share of the training; rank 0 writes the outputs."""
    inputs, settings = job.inputs, job.settings
    seed_everything(settings.training.seed)  # the same initial weights on every rank
    model, _, class_names = _initial_model(inputs, settings, context.device)
    optimizer = make_optimizer(model, settings.training.optimizer)
    teacher = make_teacher(model) if settings.use_consistency else None  # eval mode: running BatchNorm statistics
    if teacher is not None and settings.teacher_batch_statistics:  # the target batch's statistics, as the public code
        teacher = use_batch_statistics(convert_sync_batchnorm(teacher, context))
    modules = {"model": model, "optimizer": optimizer, **({"teacher": teacher} if teacher is not None else {})}
    distributions = None
    if settings.align_teacher or settings.balance_pseudo_labels:
        distributions = ClassDistributions(len(class_names), settings.alignment_momentum,
                                           settings.alignment_weight_cap).to(context.device)
        modules["distributions"] = distributions
    source, target = domains(inputs, settings.use_stm)
    if context.is_main:
        logger.info("self-training: STM %s, pseudo-labels %s, consistency %s (lambda %.3g)", settings.use_stm,
                    settings.use_pseudo_labels, settings.use_consistency, settings.consistency_weight)
    run_id = fingerprint(job.run_settings, input_signature(inputs))
    run = AdaptationRun(model, optimizer, modules, source, target, settings.training, job.paths, run_id,
                        class_names, job.run_settings)
    train_and_save(run, lambda network: SelfTrainStep(network, teacher, optimizer, settings, context, distributions),
                   context)