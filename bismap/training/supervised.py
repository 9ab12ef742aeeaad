"""Supervised training on one labelled domain: the warmup (source) and the oracle (target).

Read it top to bottom: build, maybe resume, loop, save. The loss is plain
pixel-wise cross-entropy with ignore label 255 on logits upsampled to the
label size.

With ``world_size`` N > 1 the same loop runs in N processes, one per device
(:mod:`bismap.training.distributed`): each takes its contiguous slice of the
global batch of ``batch_size`` samples, BatchNorm is synchronised, and the
loss is the mean over the valid pixels of the *global* batch, so the schedule
and the numbers do not depend on N. Only rank 0 logs, shows the progress bar
and writes the checkpoint, the loss log and the resume state; a resume state
continues with any N.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from bismap.progress import tqdm

from bismap.data.loading import AugmentSettings, Manifest, ResumableBatchSampler, SegmentationDataset, train_augmentation
from bismap.data.photometric import load_statistics
from bismap.data.samples import IGNORE_INDEX
from bismap.io import write_text
from bismap.models import ModelSettings, build_model
from bismap.provenance import run_provenance
from bismap.training.checkpoint import fingerprint, input_signature, load_resume_state, save_checkpoint, save_resume_state
from bismap.training.distributed import (DistributedContext, RankSliceBatchSampler, all_reduce_mean, capture_rng,
                                         global_mean_loss, launch_training, restore_rng, seed_rank_rng, unwrap_model,
                                         wrap_model)
from bismap.training.optim import OptimizerSettings, make_optimizer, set_poly_learning_rate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    iterations: int
    batch_size: int  # the global batch, split over the processes of a multi-GPU run
    seed: int = 0
    workers: int = 0  # DataLoader workers per process
    amp: bool = True  # mixed precision, on CUDA only
    log_interval: int = 50
    checkpoint_interval: int = 500
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)


@dataclass(frozen=True)
class RunPaths:
    checkpoint: Path  # declared output
    loss_log: Path  # declared output, TSV
    state: Path  # resume state, outside the outputs


@dataclass(frozen=True)
class _TrainJob:
    """What every process needs to train (it is pickled to the child processes)."""

    manifest_path: str | Path
    paths: RunPaths
    settings: TrainSettings
    model_settings: ModelSettings
    class_names: list[str]
    imagenet_weights: str | Path | None
    run_settings: dict[str, Any] | None
    photometric_statistics_path: str | Path | None


@dataclass
class _Run:
    """One process's training objects after setup (``network`` is ``model``, DDP-wrapped with N > 1)."""

    model: torch.nn.Module
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    run_id: str
    start: int
    history: list[tuple[int, float, float, float]]
    loader: DataLoader


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_supervised(manifest_path: str | Path, paths: RunPaths, settings: TrainSettings,
                     model_settings: ModelSettings, class_names: list[str], device: torch.device,
                     imagenet_weights: str | Path | None = None, run_settings: dict[str, Any] | None = None,
                     photometric_statistics_path: str | Path | None = None, world_size: int = 1) -> None:
    """``photometric_statistics_path``: stylize every image by GPA (BiSMAP Sec. 3.5) in the loader.

    ``device``: what ``acquire_devices(world_size)`` yielded; ``world_size`` > 1 trains in that
    many processes, one per acquired GPU (or CPU processes with gloo when there is no CUDA).
    """
    job = _TrainJob(str(manifest_path), paths, settings, model_settings, list(class_names),  # plain types: pickled
               _optional_str(imagenet_weights), run_settings, _optional_str(photometric_statistics_path))
    launch_training(_train, job, settings.batch_size, device, world_size)


def _train(context: DistributedContext, job: _TrainJob) -> None:
    """One process's share of the training; rank 0 writes the outputs."""
    run = _setup(context, job)
    history, settings = run.history, job.settings
    progress = tqdm(run.loader, total=settings.iterations, initial=run.start, desc=job.paths.checkpoint.stem,
                    unit="it", disable=not context.is_main)
    started = time.perf_counter()
    for iteration, batch in enumerate(progress, start=run.start):
        learning_rate = set_poly_learning_rate(run.optimizer, settings.optimizer, iteration, settings.iterations)
        loss = train_step(run.network, batch, run.optimizer, run.scaler, context, run.use_amp)
        history.append((iteration + 1, loss, learning_rate, time.perf_counter() - started))
        progress.set_postfix(loss=f"{loss:.3f}")
        if (iteration + 1) % settings.log_interval == 0 and context.is_main:
            window = [row[1] for row in history[-settings.log_interval:]]
            logger.info("iteration %d/%d loss %.4f lr %.2e", iteration + 1, settings.iterations,
                        float(np.mean(window)), learning_rate)
        if (iteration + 1) % settings.checkpoint_interval == 0 and iteration + 1 < settings.iterations:
            state = _state(run.run_id, iteration + 1, history, run.model, run.optimizer, run.scaler, context)
            if context.is_main:  # every rank took part above: the RNG states are gathered
                save_resume_state(job.paths.state, state)
    if context.is_main:
        provenance = run_provenance(settings.batch_size, settings.optimizer.learning_rate, settings.iterations,
                                    context.world_size, run.use_amp, context.device)
        save_checkpoint(job.paths.checkpoint, run.model, job.model_settings, job.class_names,
                        settings.iterations, job.run_settings or {}, provenance)
        write_text(job.paths.loss_log, _loss_table(history))
        job.paths.state.unlink(missing_ok=True)


def _setup(context: DistributedContext, job: _TrainJob) -> _Run:
    """Build the model (same weights on every rank), resume if a matching state exists, wrap, load."""
    settings = job.settings
    seed_everything(settings.seed)
    manifest = Manifest.load(job.manifest_path)
    photometric = load_statistics(job.photometric_statistics_path) if job.photometric_statistics_path else None
    model = build_model(job.model_settings, len(job.class_names), job.imagenet_weights).to(context.device)
    optimizer = make_optimizer(model, settings.optimizer)
    use_amp = settings.amp and context.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    extra = [photometric] if photometric else []  # GPA statistics shape training too (only hashed when used)
    inputs = [job.manifest_path, job.imagenet_weights, job.photometric_statistics_path]
    run_id = fingerprint(job.run_settings, input_signature(inputs), *extra)
    state = load_resume_state(job.paths.state, run_id)  # saved by any number of processes
    start, history = (state["iteration"], state["history"]) if state else (0, [])
    if state:
        _restore(state, model, optimizer, scaler, context, settings.seed)
    else:
        seed_rank_rng(settings.seed, context)  # ranks > 0 draw their own dropout masks
    network = wrap_model(model, context)  # SyncBN + DDP with several processes, else the model itself
    model = unwrap_model(network)  # what is saved: the network without DDP's "module." prefix
    loader = _make_loader(manifest, settings, start, photometric, context)
    network.train()
    return _Run(model, network, optimizer, scaler, use_amp, run_id, start, history, loader)


def _make_loader(manifest: Manifest, settings: TrainSettings, start: int,
                 photometric_statistics: dict[str, Any] | None = None,
                 context: DistributedContext | None = None) -> DataLoader:
    context = context or DistributedContext()
    if photometric_statistics is not None and context.is_main:
        logger.info("images stylized on the fly by GPA (BiSMAP Sec. 3.5) to target statistics of %d image(s)",
                    photometric_statistics.get("num_images", 0))
    dataset = SegmentationDataset(manifest, train_augmentation(settings.augment), labelled=True,
                                  photometric_statistics=photometric_statistics)
    # The global batch of (index, augmentation seed) is fixed by (seed, iteration); each rank loads its slice.
    sampler = ResumableBatchSampler(len(dataset), settings.batch_size, settings.seed, settings.iterations, start)
    # Its own generator: creating the iterator must not draw from the global RNG,
    # whose state the resume checkpoint restores (dropout draws from it).
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(dataset, batch_sampler=RankSliceBatchSampler(sampler, context), num_workers=settings.workers,
                      generator=generator, persistent_workers=settings.workers > 0,
                      pin_memory=torch.cuda.is_available())


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, context: DistributedContext, use_amp: bool) -> float:
    """One SGD step on this rank's slice; returns the loss of the global batch."""
    device = context.device
    images = batch["image"].to(device, non_blocking=True)  # (B/N, 3, H, W)
    labels = batch["label"].to(device, non_blocking=True)  # (B/N, H, W)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        logits = model(images).logits  # (B/N, K, H/4, W/4)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = _pixel_loss(logits.float(), labels, context)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(all_reduce_mean(loss.detach(), context))


def _pixel_loss(logits: torch.Tensor, labels: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Cross-entropy averaged over the valid pixels of the global batch. logits (b, K, H, W), labels (b, H, W)."""
    if not context.distributed:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    # Ranks hold different numbers of valid pixels: sum here, divide by the global count.
    pixel_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return global_mean_loss(pixel_sum, (labels != IGNORE_INDEX).sum(), context)


def _state(run_id: str, iteration: int, history: list, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, context: DistributedContext) -> dict[str, Any]:
    """The resume state (collective with several processes: the RNG states are gathered)."""
    return {
        "fingerprint": run_id,
        "iteration": iteration,
        "history": history,
        "model": model.state_dict(),  # the unwrapped network: no "module." prefix, loads with any N
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        **capture_rng(context),
    }


def _restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, context: DistributedContext, seed: int) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state, context, seed)


def _optional_str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def _loss_table(history: list[tuple[int, float, float, float]]) -> str:
    lines = ["iteration\tloss\tlearning_rate\tseconds"]
    lines += [f"{it}\t{loss:.6f}\t{lr:.6e}\t{seconds:.2f}" for it, loss, lr, seconds in history]
    return "\n".join(lines) + "\n"
