"""Data-parallel training on N devices, one process per device, with a fixed global batch.

A training loop written once runs on one device or on N::

    def worker(context: DistributedContext, job: Job) -> None:
        model = wrap_model(build(...).to(context.device), context)  # SyncBN + DDP; as is for N == 1
        for global_batch in batches:  # the same global batch for any N
            mine = rank_slice(global_batch, context)  # this process's contiguous part
            ...
            if context.is_main:
                save(...)  # only rank 0 writes files

    launch(worker, process_devices(device, n), job)

``launch`` (from :mod:`bismap.training.processes`, re-exported here) runs the
worker in this process for one device and in N child processes otherwise
(NCCL on CUDA, gloo on the CPU).

Results do not depend on N: the schedule counts iterations, the global batch
(``batch_size`` of the config) is split into N contiguous slices
(:func:`rank_slice`), BatchNorm statistics are those of the global batch
(``torch.nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on the CPU),
and :func:`global_mean_loss` makes DDP's averaged gradient the gradient of the
mean over the global batch even when ranks hold different numbers of valid
pixels. Dropout masks are drawn per process, so with dropout the runs are
equal in distribution, not bit for bit.

Without CUDA, N > 1 runs N CPU processes with gloo (a warning says so): the
tests use it, and it lets a laptop check a multi-GPU configuration.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from bismap.training.processes import DistributedContext, barrier, launch, process_devices
from bismap.training.sync_batchnorm import convert_cpu_sync_batchnorm

__all__ = [
    "DistributedContext", "launch", "launch_training", "process_devices", "barrier",  # processes
    "local_batch_size", "rank_slice", "RankSliceBatchSampler",  # batches
    "wrap_model", "unwrap_model", "all_reduce_sum", "all_reduce_mean", "global_mean_loss",  # model, losses
    "seed_rank_rng", "capture_rng", "restore_rng",  # random streams
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def launch_training(worker: Any, job: Any, global_batch_size: int, device: torch.device, world_size: int) -> None:
    """Run ``worker(context, job)`` on ``world_size`` processes over the devices ``acquire_devices`` gave.

    A global batch that ``world_size`` does not divide fails here, before any process starts.
    """
    local_batch_size(global_batch_size, world_size)
    launch(worker, process_devices(device, world_size), job)


# ----------------------------------------------------------------------------- batches


def local_batch_size(global_batch_size: int, world_size: int) -> int:
    """Samples per process; the global batch must split evenly (an error names both values)."""
    if world_size < 1 or global_batch_size % world_size != 0:
        raise ValueError(f"batch_size {global_batch_size} is not divisible by the number of processes "
                         f"(world_size, one per GPU) {world_size}: set batch_size to a multiple of "
                         f"{world_size} or ask for another number of GPUs")
    return global_batch_size // world_size


def rank_slice(batch: Sequence[T] | torch.Tensor, context: DistributedContext) -> Sequence[T] | torch.Tensor:
    """This process's contiguous part of a global batch (a list, or a tensor along dim 0)."""
    if not context.distributed:
        return batch
    size = local_batch_size(len(batch), context.world_size)
    return batch[context.rank * size:(context.rank + 1) * size]


class RankSliceBatchSampler(Sampler[list[T]]):
    """Wraps a batch sampler of global batches; yields this process's :func:`rank_slice` of each."""

    def __init__(self, batch_sampler: Sampler[list[T]], context: DistributedContext) -> None:
        self.batch_sampler, self.context = batch_sampler, context

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[T]]:
        for batch in self.batch_sampler:
            yield list(rank_slice(batch, self.context))


# ----------------------------------------------------------------------------- model and reductions


def convert_sync_batchnorm(model: nn.Module, context: DistributedContext) -> nn.Module:
    """BatchNorm over the global batch with N > 1 processes (CUDA: torch's; CPU: ours); ``model`` with one."""
    if not context.distributed:
        return model
    if context.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_cpu_sync_batchnorm(model)  # nn.SyncBatchNorm rejects CPU tensors


def wrap_model(model: nn.Module, context: DistributedContext, **ddp_options: Any) -> nn.Module:
    """SyncBatchNorm + DistributedDataParallel; ``model`` itself with one process.

    The parameters stay the same objects (an optimizer built on ``model`` before still
    works); ``unwrap_model`` gives back the network, whose state dict has no ``module.``.
    """
    if not context.distributed:
        return model
    model = convert_sync_batchnorm(model, context)
    device_ids = [context.device] if context.device.type == "cuda" else None
    # Synchronised BatchNorm keeps the running statistics equal on every rank: no buffer broadcast
    # before each forward (DDP still copies rank 0's parameters and buffers once, at construction).
    options = {**_no_forward_buffer_sync(), **ddp_options}
    return DistributedDataParallel(model, device_ids=device_ids, **options)


def _no_forward_buffer_sync(ddp_class: type = DistributedDataParallel) -> dict[str, bool]:
    """DDP's switch for the per-forward buffer broadcast: ``forward_sync_buffers`` from torch 2.14 (the pin),
    ``broadcast_buffers`` before it (the same meaning; lets a GPU machine's own torch run the device check)."""
    parameters = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum over processes (a new tensor, no gradient); ``tensor`` itself with one process."""
    if not context.distributed:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean over processes (no gradient); ``tensor`` itself with one process."""
    if not context.distributed:
        return tensor
    return all_reduce_sum(tensor, context) / context.world_size


def global_mean_loss(local_sum: torch.Tensor, local_count: torch.Tensor,
                     context: DistributedContext) -> torch.Tensor:
    """The loss to backpropagate so that DDP's gradient is that of sum / count over the global batch.

    ``local_sum``: () this rank's summed loss (e.g. over valid pixels); ``local_count``: ()
    what it sums over. Returns ``world_size * local_sum / global_count``: DDP averages the
    gradients of the ranks, so the average is the gradient of ``global_sum / global_count``.
    ``all_reduce_mean(returned.detach())`` is the global mean, the value to log. A global
    count of zero counts as one (the loss is then 0, not NaN).
    """
    global_count = all_reduce_sum(local_count.to(local_sum.dtype), context).clamp_min(1)
    return local_sum * context.world_size / global_count


# ----------------------------------------------------------------------------- random streams


def seed_rank_rng(seed: int, context: DistributedContext, iteration: int = 0) -> None:
    """Give ranks > 0 their own torch (and CUDA) RNG stream, e.g. for dropout; rank 0 keeps its own.

    Call it after building the model from the shared seed (same initial weights everywhere).
    """
    if context.rank == 0:
        return
    torch.manual_seed(int(np.random.SeedSequence([seed, context.rank, iteration]).generate_state(1)[0]))


def capture_rng(context: DistributedContext) -> dict[str, Any]:
    """The RNG part of a resume state; a collective call with several processes (all must call it).

    ``torch_rng`` / ``cuda_rng``: this (rank 0's) state, as a single-process run saves it;
    with several processes ``rank_rng`` also holds every rank's (torch, device) state.
    """
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "cuda_rng": _cuda_rng(context)}
    if context.distributed:
        mine = (torch.get_rng_state(), _device_rng(context))
        everyone: list[Any] = [None] * context.world_size
        dist.all_gather_object(everyone, mine)
        state["rank_rng"] = everyone
    return state


def restore_rng(state: dict[str, Any], context: DistributedContext, seed: int) -> None:
    """Undo :func:`capture_rng`, whatever the world size it was saved with.

    Same world size: every rank gets its own stream back (a resumed run equals an
    uninterrupted one). Otherwise rank 0 takes the saved main stream and the other ranks
    start fresh ones from (seed, rank, iteration).
    """
    saved = state.get("rank_rng") or []
    if context.distributed and len(saved) == context.world_size:
        torch_state, device_state = saved[context.rank]
        torch.set_rng_state(torch_state)
        if device_state is not None and context.device.type == "cuda":
            torch.cuda.set_rng_state(device_state, context.device)
        return
    if context.rank == 0:
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and context.distributed and context.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][0], context.device)
        elif state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    else:
        seed_rank_rng(seed, context, int(state.get("iteration", 0)))


def _cuda_rng(context: DistributedContext) -> list[torch.Tensor]:
    """Every visible GPU's state in one process (as before); only its own GPU's in a rank of several."""
    if not torch.cuda.is_available():
        return []
    if context.distributed and context.device.type == "cuda":
        return [torch.cuda.get_rng_state(context.device)]  # all of them would open a context on every GPU
    return torch.cuda.get_rng_state_all()


def _device_rng(context: DistributedContext) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(context.device) if context.device.type == "cuda" else None
