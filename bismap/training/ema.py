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
