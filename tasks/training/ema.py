"""EMA of the weights whose decay warms up: min(decay, (1 + t) / (10 + t)) after t updates.

A fixed decay of 0.9998 over a 450-step fine-tune keeps 0.9998**450 = 91% of the initial weights in
the EMA; warming the decay up (as TF's ExponentialMovingAverage(num_updates=...) and timm's ModelEmaV2
warm-up do) lets the EMA follow the weights early and smooth them late. The decay depends only on the
update count, which the checkpoint carries (`ema_updates`), so a resumed run continues bit-exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def warmup_decay(decay: float, updates: int) -> float:
    return min(decay, (1.0 + updates) / (10.0 + updates))


def warmup_ema_multi_avg_fn(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """`multi_avg_fn` for torch's AveragedModel; its third argument is the number of updates so far."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay={decay} must be in [0, 1].")

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], updates: torch.Tensor) -> None:
        d = warmup_decay(decay, int(updates))
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:  # integer buffers (BN's num_batches_tracked), as torch's own EMA function does
            for p_ema, p in zip(ema_params, params, strict=True):
                p_ema.copy_(p_ema * d + p * (1.0 - d))

    return update
