"""What self-training and distillation share: paired source/target batches and a resumable loop.

Both stages train on one source batch and one target batch per iteration.
Each domain has its own :class:`ResumableBatchSampler` (seeds ``seed`` and
``seed + 1``), so the pair seen at iteration i depends on (seed, i) only and a
resumed run sees exactly the batches the interrupted one would have.

:func:`run_loop` is the loop itself: poly learning rate, one ``step`` call per
iteration (the stage's own losses), a loss log with one column per loss term,
and the resume state saved every ``checkpoint_interval`` iterations outside
the declared outputs.

With N processes (:mod:`bismap.training.distributed`, as in
:mod:`bismap.training.supervised`) every process runs the same loop on its
contiguous slice of both domains' global batches (``batch_size`` each, fixed by
the config); :func:`pixel_mean` makes each loss term the mean over the pixels
of the global batch, the logged terms are global, and only rank 0 logs and
writes the loss log and the resume state (which continues with any N).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from bismap.progress import tqdm

from bismap.data.loading import Manifest, ResumableBatchSampler, SegmentationDataset, train_augmentation
from bismap.io import write_text
from bismap.losses import PixelLosses, masked_mean, masked_sum, weighted_cross_entropy_pixels
from bismap.provenance import run_provenance
from bismap.training.checkpoint import load_model, load_resume_state, save_checkpoint, save_resume_state
from bismap.training.distributed import (DistributedContext, RankSliceBatchSampler, all_reduce_mean, capture_rng,
                                         global_mean_loss, launch_training, restore_rng, seed_rank_rng, unwrap_model,
                                         wrap_model)
from bismap.training.optim import set_poly_learning_rate
from bismap.training.supervised import RunPaths, TrainSettings, seed_everything

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# (source batch, target batch, iteration) -> {loss term: tensor}; "loss" is the one optimised
StepFunction = Callable[[Batch, Batch, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class DomainData:
    """One domain's images and what replaces or adds to their labels."""

    manifest_path: str | Path
    label_paths: Mapping[str, Path] | None = None  # e.g. pseudo-labels of target images
    weight_paths: Mapping[str, Path] | None = None  # e.g. transferability maps of source images
    photometric_statistics: dict[str, Any] | None = None  # GPA of the source (BiSMAP Sec. 3.5)
    labelled: bool = True


def domain_loader(data: DomainData, settings: TrainSettings, seed: int, start: int,
                  context: DistributedContext | None = None) -> DataLoader:
    """This process's slice of each global batch of ``settings.batch_size`` samples of one domain."""
    manifest = Manifest.load(data.manifest_path)
    dataset = SegmentationDataset(manifest, train_augmentation(settings.augment), labelled=data.labelled,
                                  photometric_statistics=data.photometric_statistics,
                                  label_paths=data.label_paths, weight_paths=data.weight_paths)
    # The global batch of (index, augmentation seed) is fixed by (seed, iteration); each rank loads its slice.
    sampler = ResumableBatchSampler(len(dataset), settings.batch_size, seed, settings.iterations, start)
    generator = torch.Generator().manual_seed(seed)  # not the global RNG, which the resume state restores
    return DataLoader(dataset, batch_sampler=RankSliceBatchSampler(sampler, context or DistributedContext()),
                      num_workers=settings.workers, generator=generator,
                      persistent_workers=settings.workers > 0, pin_memory=torch.cuda.is_available())


def paired_batches(source: DomainData, target: DomainData, settings: TrainSettings, start: int,
                   context: DistributedContext | None = None) -> Iterator[tuple[Batch, Batch]]:
    return zip(domain_loader(source, settings, settings.seed, start, context),
               domain_loader(target, settings, settings.seed + 1, start, context))


def pixel_mean(pixels: PixelLosses, context: DistributedContext) -> torch.Tensor:
    """A loss term: the mean of per-pixel values over the counted pixels of the GLOBAL batch.

    ``pixels``: what a ``bismap.losses.*_pixels`` function returns for this rank's slice.
    One process: exactly the loss function's own mean. N processes: the value to
    backpropagate (see ``global_mean_loss``); ``all_reduce_mean`` of it is the global mean.
    """
    if not context.distributed:
        return masked_mean(*pixels)
    return global_mean_loss(*masked_sum(*pixels), context)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(b, K, h, w) maps bilinearly to (b, K, *size) (an exact copy at the same size)."""
    return torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def upsample_to(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b, K, h, w) logits bilinearly to the (b, H, W) labels' size: (b, K, H, W)."""
    return resize_maps(logits, tuple(labels.shape[-2:]))


def image_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, context: DistributedContext,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy at label resolution over the labelled pixels of the global batch (per-pixel ``weights``)."""
    return pixel_mean(weighted_cross_entropy_pixels(upsample_to(logits, labels), labels, weights), context)


@dataclass
class LoopState:
    """What a resume restores besides the RNG: modules and optimizer by name, the loss history."""

    modules: dict[str, Any]  # anything with state_dict()/load_state_dict(): models, optimizer, scaler
    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def save(self, path: Path, run_id: str, context: DistributedContext | None = None) -> None:
        """Rank 0 writes; collective with several processes (every rank must call it: RNGs are gathered)."""
        context = context or DistributedContext()
        state = {name: module.state_dict() for name, module in self.modules.items()}  # unwrapped: no "module."
        state.update(fingerprint=run_id, iteration=self.iteration, history=self.history, **capture_rng(context))
        if context.is_main:
            save_resume_state(path, state)

    def restore(self, path: Path, run_id: str, context: DistributedContext | None = None, seed: int = 0) -> None:
        """Load a matching state saved by any number of processes; call it before ``wrap_model``.

        Without one, ranks > 0 get their own RNG stream from ``seed`` (dropout); rank 0 keeps its own.
        """
        context = context or DistributedContext()
        state = load_resume_state(path, run_id)
        if state is None:
            seed_rank_rng(seed, context)
            return
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.iteration, self.history = state["iteration"], state["history"]
        restore_rng(state, context, seed)


def run_loop(step: StepFunction, batches: Iterator[tuple[Batch, Batch]], optimizer: torch.optim.Optimizer,
             settings: TrainSettings, state: LoopState, paths: RunPaths, run_id: str,
             context: DistributedContext | None = None) -> None:
    """Train from ``state.iteration`` to ``settings.iterations``; rank 0 writes the loss log at the end."""
    context = context or DistributedContext()
    progress = tqdm(batches, total=settings.iterations, initial=state.iteration, desc=paths.checkpoint.stem,
                    unit="it", disable=not context.is_main)
    started = time.perf_counter()
    for iteration, (source, target) in enumerate(progress, start=state.iteration):
        learning_rate = set_poly_learning_rate(optimizer, settings.optimizer, iteration, settings.iterations)
        terms = global_terms(step(source, target, iteration), context)
        state.history.append({"iteration": iteration + 1, **terms, "learning_rate": learning_rate,
                              "seconds": time.perf_counter() - started})
        state.iteration = iteration + 1
        progress.set_postfix(loss=f"{terms['loss']:.3f}")
        if state.iteration % settings.log_interval == 0 and context.is_main:
            _log_window(state.history[-settings.log_interval:], settings.iterations)
        if state.iteration % settings.checkpoint_interval == 0 and state.iteration < settings.iterations:
            state.save(paths.state, run_id, context)  # every rank: the RNG states are gathered
    if context.is_main:
        write_text(paths.loss_log, loss_table(state.history))


@dataclass(frozen=True)
class AdaptationRun:
    """One process's self-training or distillation run: what trains, on what, and where it is saved."""

    model: torch.nn.Module  # the network being trained, not yet wrapped for DDP
    optimizer: torch.optim.Optimizer
    modules: dict[str, Any]  # what the resume state holds: the model, the optimizer, an EMA teacher
    source: DomainData
    target: DomainData
    settings: TrainSettings
    paths: RunPaths
    run_id: str  # fingerprint of everything that shapes training: a resume state must match it
    class_names: list[str]
    run_settings: dict[str, Any]  # stored in the checkpoint


def train_and_save(run: AdaptationRun, make_step: Callable[[torch.nn.Module], StepFunction],
                   context: DistributedContext,
                   make_batches: Callable[[int], Iterator[tuple[Batch, Batch]]] | None = None) -> None:
    """Resume if a matching state exists, wrap the model (DDP, SyncBN), train, and (rank 0) save it.

    ``make_batches(start)``: the paired batches from iteration ``start`` when a method changes its data during
    the run (the contrastive method renews its static labels); by default ``paired_batches``.
    """
    state = LoopState(run.modules)
    state.restore(run.paths.state, run.run_id, context, run.settings.seed)  # before DDP: keys without "module."
    network = wrap_model(run.model, context)  # SyncBN + DDP with several processes, else the model itself
    network.train()
    batches = make_batches(state.iteration) if make_batches else \
        paired_batches(run.source, run.target, run.settings, state.iteration, context)
    run_loop(make_step(network), batches, run.optimizer, run.settings, state, run.paths, run.run_id, context)
    if context.is_main:
        provenance = run_provenance(run.settings.batch_size, run.settings.optimizer.learning_rate,
                                    run.settings.iterations, context.world_size, False, context.device)  # no AMP here
        save_checkpoint(run.paths.checkpoint, unwrap_model(network), run.model.settings, run.class_names,
                        run.settings.iterations, run.run_settings, provenance)
        run.paths.state.unlink(missing_ok=True)


def global_terms(terms: dict[str, torch.Tensor], context: DistributedContext) -> dict[str, float]:
    """The loss terms of the global batch (one all-reduce for all of them); the values themselves for N == 1."""
    values = torch.stack([value.detach().double() for value in terms.values()])  # (terms,), exact float32 -> 64
    return dict(zip(terms, all_reduce_mean(values, context).tolist()))


def _log_window(window: list[dict[str, float]], iterations: int) -> None:
    names = [name for name in window[-1] if name not in ("iteration", "learning_rate", "seconds")]
    means = " ".join(f"{name} {np.mean([row.get(name, np.nan) for row in window]):.4f}" for name in names)
    logger.info("iteration %d/%d %s lr %.2e", window[-1]["iteration"], iterations, means,
                window[-1]["learning_rate"])


def loss_table(history: list[dict[str, float]]) -> str:
    """TSV: iteration, every loss term, learning rate, seconds since the (re)start."""
    if not history:
        return "iteration\n"
    columns = list(history[0])
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(str(row[name]) if name == "iteration" else f"{row.get(name, float('nan')):.6g}"
                               for name in columns))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WarmupInputs:
    """A method that makes its target labels while it trains needs the warmup and the two domains only."""

    warmup_checkpoint: Path  # the initial student, its momentum copy and the fixed soft labels
    source_manifest: Path
    target_manifest: Path


def launch_one_process(worker: Callable[..., None], job: tuple, settings: TrainSettings, device: torch.device,
                       world_size: int, method: str, unsynchronised: str) -> None:
    """``launch_training`` on one process; refuses more (``unsynchronised``: the state no all-reduce keeps equal)."""
    if world_size != 1:
        raise ValueError(f"{method} trains in one process ({unsynchronised} not synchronised); got {world_size}")
    launch_training(worker, job, settings.batch_size, device, 1)


def seeded_start(checkpoint_path: Path, seed: int, device: torch.device) -> tuple[torch.nn.Module, list[str]]:
    """Seed every generator (the same initial weights on every rank), then load the model to train and its classes."""
    seed_everything(seed)
    model, checkpoint = load_model(checkpoint_path, device)
    return model, list(checkpoint["class_names"])
