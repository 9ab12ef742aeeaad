"""The exponential-moving-average teacher of the consistency term (BiSMAP Eq. 12, Tarvainen & Valpola)."""

from __future__ import annotations

import copy

import torch


def make_teacher(student: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the student, in eval mode (its BatchNorm uses the running statistics)."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def use_batch_statistics(teacher: torch.nn.Module) -> torch.nn.Module:
    """Let the teacher's BatchNorm layers normalise with each batch's own statistics (train mode), as the public
    BiSMAP code runs its EMA teacher (``BaseNet_ema.train()``, models/adaptation_model.py:166, commit 8789a0d).

    Momentum 0 leaves the running statistics as the EMA made them (the public code overwrites them from the
    student at every update, so they never matter there either); everything else stays in eval mode.
    """
    for module in teacher.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0
    return teacher


@torch.no_grad()
def update_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """theta_teacher <- decay * theta_teacher + (1 - decay) * theta_student.

    Floating-point buffers (BatchNorm running statistics) are averaged the same
    way; integer buffers (``num_batches_tracked``) are copied. ``decay`` 0
    copies the student.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        source = student_state[name]
        if value.dtype.is_floating_point:
            value.mul_(decay).add_(source.detach(), alpha=1.0 - decay)
        else:
            value.copy_(source)
