"""Distillation of the self-trained model into a fresh student (ProDA Sec. 3.4, Eq. 12; BiSMAP's "*" rows).

Per iteration, with the self-trained model as a frozen teacher h and the
student h-dagger::

    L_KD = CE(h-dagger(x^s), y^s)                  source labels
         + CE(h-dagger(x^t), xi(p_t))              the teacher's hard, confident labels
         + beta KL(p_t || p_t-dagger)              p_t = h(x^t), on the same target image

``xi(p_t)`` are the PNGs of rule ``teacher_pseudo_labels`` (flip-averaged,
confidence >= 0.95 in ProDA); the KL term uses the teacher's online soft
prediction on the same augmented target batch. The student starts from a
self-supervised checkpoint when one is given (ProDA: SimCLRv2), else as the
warmup did (ImageNet weights, or random for the embedded benchmark), or, with
``student_init: warmup``, from the warmup model itself.

With ``world_size`` N > 1 (as in :mod:`bismap.training.supervised`) each of N
processes distils on its contiguous slice of both global batches; the student's
BatchNorm is synchronised, every term is a mean over the pixels of the global
batch, and the frozen teacher (eval mode) runs on each rank's own slice. Only
rank 0 logs and writes the checkpoint, the loss log and the resume state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bismap.data.photometric import load_statistics
from bismap.io import shard_png_paths
from bismap.losses import kl_divergence_pixels
from bismap.models import build_model
from bismap.stm.embeddings import check_state, torchvision_state
from bismap.training.adaptation import AdaptationRun, Batch, DomainData, image_cross_entropy, pixel_mean, train_and_save
from bismap.training.checkpoint import fingerprint, input_signature, load_model
from bismap.training.distributed import DistributedContext, launch_training
from bismap.training.ema import make_teacher
from bismap.training.optim import make_optimizer
from bismap.training.supervised import RunPaths, TrainSettings, seed_everything

logger = logging.getLogger(__name__)

STUDENT_INITS = ("pretrained", "warmup", "teacher")


@dataclass(frozen=True)
class DistillSettings:
    training: TrainSettings
    kl_weight: float = 1.0  # beta of ProDA Eq. 12
    # 'pretrained': student_checkpoint, else the warmup's own init; 'warmup': the warmup model; 'teacher': a copy
    # of the teacher (self-distillation, where no self-supervised network exists)
    student_init: str = "pretrained"

    def __post_init__(self) -> None:
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"distill.student_init must be one of {STUDENT_INITS}, got '{self.student_init}'")


@dataclass(frozen=True)
class DistillInputs:
    teacher_checkpoint: Path  # the self-trained model
    warmup_checkpoint: Path
    source_manifest: Path
    target_manifest: Path
    teacher_label_dirs: list[Path]  # shard folders of the teacher's hard labels
    student_checkpoint: Path | None = None  # self-supervised backbone weights (torchvision layout)
    imagenet_weights: Path | None = None
    photometric_statistics: Path | None = None


@dataclass(frozen=True)
class _DistillJob:
    """What every process needs to train (it is pickled to the child processes)."""

    inputs: DistillInputs
    paths: RunPaths
    settings: DistillSettings
    run_settings: dict[str, Any]


class DistillStep:
    """ProDA Eq. 12 and one SGD step on this rank's slice (b = B / N images per domain)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 kl_weight: float, context: DistributedContext | None = None) -> None:
        """``student``: DDP-wrapped with N > 1; ``teacher``: frozen, in eval mode."""
        self.student, self.teacher, self.optimizer, self.kl_weight = student, teacher, optimizer, kl_weight
        self.context = context or DistributedContext()
        self.device = self.context.device

    def __call__(self, source: Batch, target: Batch, iteration: int) -> dict[str, torch.Tensor]:
        source_images = source["image"].to(self.device)  # (b, 3, H, W)
        target_images = target["image"].to(self.device)  # (b, 3, H, W)
        logits = self.student(torch.cat([source_images, target_images])).logits  # (2b, K, H/4, W/4)
        source_logits, target_logits = logits.split(len(source_images))
        with torch.no_grad():
            teacher_logits = self.teacher(target_images).logits  # (b, K, H/4, W/4)
        terms = {"source_ce": image_cross_entropy(source_logits, source["label"].to(self.device), self.context),
                 "target_ce": image_cross_entropy(target_logits, target["label"].to(self.device), self.context),
                 "kl": pixel_mean(kl_divergence_pixels(teacher_logits, target_logits), self.context)}
        loss = terms["source_ce"] + terms["target_ce"] + self.kl_weight * terms["kl"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # with N > 1, DDP averages the gradients
        self.optimizer.step()
        return {"loss": loss, **terms}


def make_student(inputs: DistillInputs, settings: DistillSettings, device: torch.device) -> torch.nn.Module:
    """The student network (same architecture as the teacher), initialised per ``student_init``."""
    if settings.student_init == "teacher":
        logger.info("student initialised as a copy of the teacher %s", inputs.teacher_checkpoint)
        return load_model(inputs.teacher_checkpoint, device)[0]
    warmup, checkpoint = load_model(inputs.warmup_checkpoint, device)
    if settings.student_init == "warmup":
        logger.info("student initialised from the warmup model %s", inputs.warmup_checkpoint)
        return warmup
    student = build_model(warmup.settings, len(checkpoint["class_names"]), inputs.imagenet_weights)
    if inputs.student_checkpoint is not None:
        # the layouts the STM's embedding network accepts (torchvision keys, SimCLRv2 conversion, ...)
        path = inputs.student_checkpoint
        state = torchvision_state(torch.load(path, map_location="cpu", weights_only=True), path)
        student.encoder.load_state_dict(check_state(student.encoder, state, path, "student backbone"))
        logger.info("student backbone from the self-supervised checkpoint %s", path)
    else:
        logger.info("student initialised as the warmup was (%s)", inputs.imagenet_weights or "random")
    return student.to(device)


def distill(inputs: DistillInputs, paths: RunPaths, settings: DistillSettings, device: torch.device,
            run_settings: dict[str, Any], world_size: int = 1) -> None:
    """Train the student and write its checkpoint and loss log; resumable from ``paths.state`` (any world size).

    ``device``: what ``acquire_devices(world_size)`` yielded; ``world_size`` > 1 trains in that
    many processes, one per acquired GPU (or CPU processes with gloo when there is no CUDA).
    """
    launch_training(_distill, _DistillJob(inputs, paths, settings, run_settings), settings.training.batch_size,
                    device, world_size)


def _distill(context: DistributedContext, job: _DistillJob) -> None:
    """One process's share of the training; rank 0 writes the outputs."""
    inputs, settings = job.inputs, job.settings
    seed_everything(settings.training.seed)  # the same initial weights on every rank
    teacher_model, checkpoint = load_model(inputs.teacher_checkpoint, context.device)
    teacher = make_teacher(teacher_model)
    student = make_student(inputs, settings, context.device)
    optimizer = make_optimizer(student, settings.training.optimizer)
    photometric = load_statistics(inputs.photometric_statistics) if inputs.photometric_statistics else None
    source = DomainData(inputs.source_manifest, photometric_statistics=photometric)
    target = DomainData(inputs.target_manifest, label_paths=shard_png_paths(inputs.teacher_label_dirs, "teacher label"))
    run_id = fingerprint(job.run_settings, input_signature(inputs))
    run = AdaptationRun(student, optimizer, {"model": student, "optimizer": optimizer}, source, target,
                        settings.training, job.paths, run_id, list(checkpoint["class_names"]), job.run_settings)
    train_and_save(run, lambda network: DistillStep(network, teacher, optimizer, settings.kl_weight, context),
                   context)