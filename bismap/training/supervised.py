"""Supervised training on one labelled domain: the warmup (source) and the oracle (target).

Read it top to bottom: build, maybe resume, loop, save. The loss is plain
pixel-wise cross-entropy with ignore label 255 on logits upsampled to the
label size.
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
from tqdm import tqdm

from bismap.data.loading import AugmentSettings, Manifest, ResumableBatchSampler, SegmentationDataset, train_augmentation
from bismap.data.photometric import load_statistics
from bismap.data.samples import IGNORE_INDEX
from bismap.io import write_text
from bismap.models import ModelSettings, build_model
from bismap.training.checkpoint import fingerprint, load_resume_state, save_checkpoint, save_resume_state
from bismap.training.optim import OptimizerSettings, make_optimizer, set_poly_learning_rate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    iterations: int
    batch_size: int
    seed: int = 0
    workers: int = 0
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_supervised(manifest_path: str | Path, paths: RunPaths, settings: TrainSettings,
                     model_settings: ModelSettings, class_names: list[str], device: torch.device,
                     imagenet_weights: str | Path | None = None, run_settings: dict[str, Any] | None = None,
                     photometric_statistics_path: str | Path | None = None) -> None:
    """``photometric_statistics_path``: stylize every image by GPA (BiSMAP Sec. 3.5) in the loader."""
    seed_everything(settings.seed)
    manifest = Manifest.load(manifest_path)
    photometric = load_statistics(photometric_statistics_path) if photometric_statistics_path else None
    model = build_model(model_settings, len(class_names), imagenet_weights).to(device)
    optimizer = make_optimizer(model, settings.optimizer)
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    extra = [photometric] if photometric else []  # GPA statistics shape training too (only hashed when used)
    run_id = fingerprint(run_settings, str(manifest_path), len(manifest.samples), *extra)
    state = load_resume_state(paths.state, run_id)
    start, history = (state["iteration"], state["history"]) if state else (0, [])
    if state:
        _restore(state, model, optimizer, scaler)
    loader = _make_loader(manifest, settings, start, photometric)
    model.train()
    progress = tqdm(loader, total=settings.iterations, initial=start, desc=paths.checkpoint.stem, unit="it")
    started = time.perf_counter()
    for iteration, batch in enumerate(progress, start=start):
        learning_rate = set_poly_learning_rate(optimizer, settings.optimizer, iteration, settings.iterations)
        loss = _train_step(model, batch, optimizer, scaler, device, use_amp)
        history.append((iteration + 1, loss, learning_rate, time.perf_counter() - started))
        progress.set_postfix(loss=f"{loss:.3f}")
        if (iteration + 1) % settings.log_interval == 0:
            window = [row[1] for row in history[-settings.log_interval:]]
            logger.info("iteration %d/%d loss %.4f lr %.2e", iteration + 1, settings.iterations,
                        float(np.mean(window)), learning_rate)
        if (iteration + 1) % settings.checkpoint_interval == 0 and iteration + 1 < settings.iterations:
            save_resume_state(paths.state, _state(run_id, iteration + 1, history, model, optimizer, scaler))
    save_checkpoint(paths.checkpoint, model, model_settings, class_names, settings.iterations, run_settings or {})
    write_text(paths.loss_log, _loss_table(history))
    paths.state.unlink(missing_ok=True)


def _make_loader(manifest: Manifest, settings: TrainSettings, start: int,
                 photometric_statistics: dict[str, Any] | None = None) -> DataLoader:
    if photometric_statistics is not None:
        logger.info("images stylized on the fly by GPA (BiSMAP Sec. 3.5) to target statistics of %d image(s)",
                    photometric_statistics.get("num_images", 0))
    dataset = SegmentationDataset(manifest, train_augmentation(settings.augment), labelled=True,
                                  photometric_statistics=photometric_statistics)
    sampler = ResumableBatchSampler(len(dataset), settings.batch_size, settings.seed, settings.iterations, start)
    # Its own generator: creating the iterator must not draw from the global RNG,
    # whose state the resume checkpoint restores (dropout draws from it).
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=settings.workers, generator=generator,
                      persistent_workers=settings.workers > 0, pin_memory=torch.cuda.is_available())


def _train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device, use_amp: bool) -> float:
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
    labels = batch["label"].to(device, non_blocking=True)  # (B, H, W)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        logits = model(images).logits  # (B, K, H/4, W/4)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def _state(run_id: str, iteration: int, history: list, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    return {
        "fingerprint": run_id,
        "iteration": iteration,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _loss_table(history: list[tuple[int, float, float, float]]) -> str:
    lines = ["iteration\tloss\tlearning_rate\tseconds"]
    lines += [f"{it}\t{loss:.6f}\t{lr:.6e}\t{seconds:.2f}" for it, loss, lr, seconds in history]
    return "\n".join(lines) + "\n"
