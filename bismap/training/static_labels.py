"""Renewal of the contrastive method's static labels y_F (paper 003, Sec. 4.1: renewed every 10,000 iterations).

The static labels start as the baseline label files (the warmup's confident
predictions, made by rule pseudo_labels). Every ``static_label_interval``
iterations the model being trained labels target-train again with the same
strategy (``baseline_pseudo_labels``) at the SAME COVERAGE as the initial files:
its confidence threshold is the one that labels that share of the pixels. The
paper's static labels come from CBST, whose thresholds keep a proportion of the
pixels (the public code: class-balanced proportions); a fixed threshold on a
model that the entropy terms make ever more confident would label more and
more pixels, wrongly (development seed 9: 0.74 -> 0.88 of the pixels after
four renewals, and 5-16 mIoU lost). The target loader restarts on the new
files at the same place of its batch sequence: a run whose renewals never fire
is the run without renewals, batch for batch. The renewed files are resume
state, not outputs: they live next to the run's state file, a resumed run finds
those made before its state and redoes the one at its own iteration, and the
folder is removed once the checkpoint is written.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.data.samples import IGNORE_INDEX
from bismap.io import atomic_directory, shard_png_paths
from bismap.labels.coverage import shard_coverage_settings
from bismap.labels.strategies import LabellingShard, PseudoLabelSettings, label_shard
from bismap.training.adaptation import AdaptationRun, Batch, DomainData, paired_batches
from bismap.training.distributed import DistributedContext

logger = logging.getLogger(__name__)


def renewal_iterations(interval: int, iterations: int) -> list[int]:
    """The iterations after which y_F is renewed: every ``interval``, before the run's end."""
    return list(range(interval, iterations, interval))


def renewal_folder(state_path: Path) -> Path:
    """Where a run keeps its renewed static labels: beside its resume state, e.g. .state/selftrain_x_static_labels/."""
    return state_path.parent / f"{state_path.stem}_static_labels"


def label_coverage(label_paths: Mapping[str, Path]) -> float:
    """The share of labelled (not ignored) pixels over a label set's PNGs."""
    labelled, total = 0, 0
    for path in label_paths.values():
        labels = np.asarray(Image.open(path))
        labelled, total = labelled + int((labels != IGNORE_INDEX).sum()), total + labels.size
    return labelled / max(total, 1)


def renew_static_labels(run: AdaptationRun, settings: PseudoLabelSettings, coverage: float, folder: Path,
                        device: torch.device) -> DomainData:
    """Label target-train with the model as it is now (eval mode) at ``coverage`` into ``folder``; the target data
    on those labels."""
    if settings.strategy != "confidence":
        raise ValueError(f"contrastive static labels are renewed with strategy 'confidence', not '{settings.strategy}'"
                         " (selftrain.baseline_pseudo_labels)")
    manifest = Manifest.load(run.target.manifest_path)
    shard = LabellingShard(run.model, run.class_names, None, manifest, SegmentationDataset(manifest, labelled=False),
                           False)
    run.model.eval()
    try:
        matched = shard_coverage_settings(shard, settings, coverage, device)
        with atomic_directory(folder) as temporary:
            statistics = label_shard(shard, matched, temporary, device, f"static labels ({folder.name})")
    finally:
        run.model.train()
    logger.info("static labels renewed (%s): confidence >= %.5g, PL ratio %.3f (initial %.3f)", folder.name,
                matched.confidence, statistics["pl_ratio"], coverage)
    return _renewed_target(run, folder)


def _renewed_target(run: AdaptationRun, folder: Path) -> DomainData:
    """The target data on the renewed labels in ``folder``."""
    return DomainData(run.target.manifest_path, label_paths=shard_png_paths([folder], "renewed static label"))


def renewing_batches(run: AdaptationRun, settings: PseudoLabelSettings, interval: int, folder: Path,
                     context: DistributedContext) -> Callable[[int], Iterator[tuple[Batch, Batch]]]:
    """``make_batches`` for ``train_and_save``: paired batches from ``start``, y_F renewed at each renewal iteration.

    The generator is lazy: it renews when the loop asks for the first batch after a renewal iteration, that is
    after that many optimiser steps.
    """
    points = renewal_iterations(interval, run.settings.iterations)
    coverage = label_coverage(run.target.label_paths) if points else 1.0  # of the initial y_F

    def batches(start: int) -> Iterator[tuple[Batch, Batch]]:
        target, position = _target_at(run, folder, points, start), start
        while position < run.settings.iterations:
            if position in points:
                target = renew_static_labels(run, settings, coverage, folder / f"iteration_{position}",
                                             context.device)
            stop = min([point for point in points if point > position] + [run.settings.iterations])
            yield from islice(paired_batches(run.source, target, run.settings, position, context), stop - position)
            position = stop

    return batches


def _target_at(run: AdaptationRun, folder: Path, points: list[int], start: int) -> DomainData:
    """The target data a run (re)starting at ``start`` trains on: the last renewal before it, else the initial y_F."""
    earlier = [point for point in points if point < start]
    if not earlier:
        return run.target
    renewed = folder / f"iteration_{earlier[-1]}"
    if not renewed.is_dir():
        raise FileNotFoundError(f"the resume state {run.paths.state} (iteration {start}) needs the static labels "
                                f"renewed at iteration {earlier[-1]} in {renewed}; delete the state to start over")
    return _renewed_target(run, renewed)


def remove_renewals(folder: Path) -> None:
    """Once the checkpoint is written the renewed labels are no longer needed to resume."""
    shutil.rmtree(folder, ignore_errors=True)
