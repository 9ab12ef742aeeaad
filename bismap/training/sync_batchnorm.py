"""Synchronised BatchNorm for CPU processes (gloo), which ``torch.nn.SyncBatchNorm`` refuses.

``torch.nn.SyncBatchNorm`` only accepts CUDA/XPU tensors (its kernels,
``torch.batch_norm_stats`` and friends, have no CPU implementation in torch
2.14). Multi-process training on the CPU (tests, laptops) uses this module
instead: in training mode, with a process group of more than one process, the
batch statistics are those of the *global* batch (every process's slice
together), so each process normalises exactly as one process holding the whole
batch would, and the gradient flows through the statistics across processes
(a differentiable all-reduce). Elsewhere (eval mode, one process) it is a plain
BatchNorm. Its state dict has the keys of ``nn.BatchNorm2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each input is the sum of the gradients of the output."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        total = grad_output.clone()
        dist.all_reduce(total)
        return total


def differentiable_all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``all_reduce(SUM)`` that autograd can backpropagate through (needs an initialised process group)."""
    return _AllReduceSum.apply(tensor)


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all processes, for any device (written for CPU and gloo)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synchronise = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synchronise:
            return super().forward(input)
        return self._global_batch_norm(input)

    def _global_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *); statistics over B, * and every process."""
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast a (C,) vector over x
        local_count = x.new_tensor([x.numel() // x.shape[1]])
        totals = differentiable_all_reduce_sum(torch.cat([x.sum(dims), local_count]))  # (C + 1,)
        count = totals[-1].detach()
        mean = totals[:-1] / count  # (C,)
        centred = x - mean.view(shape)
        variance = differentiable_all_reduce_sum(centred.square().sum(dims)) / count  # (C,), biased
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        self._update_running_statistics(mean.detach(), variance.detach(), count)
        return output

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, variance: torch.Tensor, count: torch.Tensor) -> None:
        """As ``F.batch_norm`` does: exponential (or cumulative) average, unbiased variance."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * (count / (count - 1).clamp_min(1))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by a :class:`CpuSyncBatchNorm` sharing its parameters and buffers.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the parameters are
    the same objects, so an optimizer built before the conversion still holds them.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, (CpuSyncBatchNorm, nn.SyncBatchNorm)):
        converted = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_cpu_sync_batchnorm(child))
    return module
