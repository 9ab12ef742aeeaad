"""Workers for tests/test_distributed.py, imported by name in the child processes.

Kept light (torch and bismap.training.distributed at import time): the child
processes of every launch import this module, and on a shared 2-core machine
each second of import is paid per process and per test.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn import functional as F

from bismap.training.distributed import DistributedContext, all_reduce_mean, rank_slice, unwrap_model, wrap_model

if TYPE_CHECKING:
    from bismap.models import ModelSettings
    from bismap.training.selftrain import _SelfTrainJob


def fail_on_rank_one(context: DistributedContext) -> int:
    """Rank 1 raises; rank 0 sleeps (in no collective, so only the launcher can stop it)."""
    if context.rank == 1:
        raise ValueError("rank one fails on purpose")
    time.sleep(600)
    return context.rank


def gradient_differences(context: DistributedContext, settings: ModelSettings, num_classes: int,
                         dtypes: list[torch.dtype]) -> dict[str, dict[str, float]]:
    """Per dtype: how far one distributed step is from the 1-process step on the same global batch."""
    return {str(dtype): _differences(context, settings, num_classes, dtype) for dtype in dtypes}


def _differences(context: DistributedContext, settings: ModelSettings, num_classes: int,
                 dtype: torch.dtype) -> dict[str, float]:
    """Relative difference of loss and gradients, absolute of the BN running statistics (rank 0 compares)."""
    from bismap.models import build_model  # torchvision: only where needed (see the module docstring)

    torch.manual_seed(0)
    model = build_model(settings, num_classes).to(dtype)
    images = torch.randn(4, 3, 32, 32, dtype=dtype)  # (B, 3, H, W), the global batch
    labels = torch.randint(0, num_classes, (4, 32, 32))  # (B, H, W)
    labels[0, :20] = 255  # rank 0's slice has fewer valid pixels than rank 1's
    reference = copy.deepcopy(model)
    reference_loss = _loss(reference, images, labels, DistributedContext())
    reference_loss.backward()
    network = wrap_model(model, context)
    loss = _loss(network, rank_slice(images, context), rank_slice(labels, context), context)
    loss.backward()
    gradients = [(mine.grad - theirs.grad).abs().max() / theirs.grad.abs().max()
                 for mine, theirs in zip(model.parameters(), reference.parameters())]
    statistics = [(value - reference.state_dict()[key]).abs().max()
                  for key, value in unwrap_model(network).state_dict().items() if "running" in key]
    return {"loss": float(abs(all_reduce_mean(loss.detach(), context) / reference_loss.detach() - 1)),
            "gradient": float(max(gradients)), "running_statistics": float(max(statistics))}


def _loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
          context: DistributedContext) -> torch.Tensor:
    from bismap.training.supervised import _pixel_loss

    logits = F.interpolate(model(images).logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return _pixel_loss(logits, labels, context)  # the training loss: global mean over valid pixels


def self_train_comparing_ranks(context: DistributedContext, job: _SelfTrainJob) -> list[bool]:
    """``selftrain._self_train``; after each EMA update: do all ranks hold the same student and teacher, bit for bit?"""
    from bismap.training import selftrain  # torchvision: only where needed (see the module docstring)

    update, same = selftrain.update_ema, []

    def update_then_compare(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
        update(teacher, student, decay)
        same.append(_same_on_every_rank(teacher, context) and _same_on_every_rank(student, context))

    selftrain.update_ema = update_then_compare  # in this child process only
    selftrain._self_train(context, job)
    return same


def _same_on_every_rank(module: torch.nn.Module, context: DistributedContext) -> bool:
    """Every parameter and buffer equal to rank 0's (float64 holds float32 and the BN counters exactly)."""
    mine = torch.cat([value.detach().double().flatten() for value in module.state_dict().values()])
    everyone = [torch.empty_like(mine) for _ in range(context.world_size)]
    dist.all_gather(everyone, mine)
    return all(torch.equal(other, everyone[0]) for other in everyone)
