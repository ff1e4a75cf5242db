"""Optimizer parameter groups and per-iteration learning-rate schedules."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float, norm_bias_decay: float = 0.0) -> list[dict]:
    """No weight decay on BN parameters and biases (what torchvision's and mmdet's recipes do)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": norm_bias_decay}]


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], model: nn.Module,
                    weight_decay: float, norm_bias_decay: float = 0.0) -> torch.optim.Optimizer:
    return factory(parameter_groups(model, weight_decay, norm_bias_decay))


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_factor: float = 0.001,
                  min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            alpha = step / max(1, warmup_steps)
            return warmup_factor * (1 - alpha) + alpha
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def warmup_poly(total_steps: int, warmup_steps: int, warmup_factor: float = 0.001,
                power: float = 0.9) -> Callable[[int], float]:
    """DeepLab's "poly" schedule: (1 - step / total) ** power, after an optional linear warm-up."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            alpha = step / max(1, warmup_steps)
            return warmup_factor * (1 - alpha) + alpha
        return max(0.0, 1 - step / max(1, total_steps)) ** power
    return factor


def warmup_step(total_steps: int, warmup_steps: int, warmup_factor: float = 0.001,
                milestones: Sequence[float] = (0.67, 0.89), gamma: float = 0.1) -> Callable[[int], float]:
    """Step decay: lr x gamma at each milestone, given as a fraction of the whole run (mmdetection's
    1x schedule drops at epochs 8 and 11 of 12: milestones [0.67, 0.89]), after a linear warm-up."""
    bounds = sorted(int(round(m * total_steps)) for m in milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            alpha = step / max(1, warmup_steps)
            return warmup_factor * (1 - alpha) + alpha
        return gamma ** sum(step >= b for b in bounds)
    return factor


SCHEDULES = {"cosine": warmup_cosine, "poly": warmup_poly, "step": warmup_step}


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int,
                    **options) -> torch.optim.lr_scheduler.LambdaLR:
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} is unknown; expected one of {sorted(SCHEDULES)}.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[name](total_steps, warmup_steps, **options))


def scheduler_from_config(optimizer: torch.optim.Optimizer, schedule: dict, total_steps: int,
                          steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A conf/schedule/*.yaml node -> per-iteration LambdaLR. The node's `_target_` is any factory
    `(total_steps, warmup_steps, **options) -> factor(step)` (a user's own included); `warmup_epochs`
    becomes `warmup_steps`. A node from before schedules had targets names one by `name`."""
    from hydra.utils import get_object

    options = dict(schedule)
    warmup_steps = int(options.pop("warmup_epochs", 0.0) * steps_per_epoch)
    options.pop("_partial_", None)
    if "_target_" in options:
        options.pop("name", None)
        factory = get_object(str(options.pop("_target_")))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factory(total_steps, warmup_steps, **options))
    return build_scheduler(optimizer, str(options.pop("name", "cosine")), total_steps, warmup_steps, **options)
