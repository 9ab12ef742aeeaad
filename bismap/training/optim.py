"""SGD with the poly learning-rate schedule used by all five papers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bismap.models.deeplab import DeepLabV3Plus


@dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float = 5e-4
    head_lr_multiplier: float = 10.0  # decoder and classifier learn faster than the backbone
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9


def make_optimizer(model: DeepLabV3Plus, settings: OptimizerSettings) -> torch.optim.SGD:
    groups = [
        {"params": list(model.encoder.parameters()), "lr_scale": 1.0},
        {"params": model.head_parameters(), "lr_scale": settings.head_lr_multiplier},
    ]
    optimizer = torch.optim.SGD(groups, lr=settings.learning_rate, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    set_poly_learning_rate(optimizer, settings, iteration=0, total_iterations=1)
    return optimizer


def set_poly_learning_rate(optimizer: torch.optim.Optimizer, settings: OptimizerSettings,
                           iteration: int, total_iterations: int) -> float:
    """lr = base * (1 - iteration / total) ** power; returns the backbone's rate."""
    factor = (1.0 - iteration / max(1, total_iterations)) ** settings.poly_power
    for group in optimizer.param_groups:
        group["lr"] = settings.learning_rate * factor * group["lr_scale"]
    return settings.learning_rate * factor
