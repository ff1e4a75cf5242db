"""Progressive resizing: the early epochs train on smaller images, the last ones at the input size.

A network's cost grows with the image area, and the early epochs, which only have to find coarse
features, learn them as well from smaller images (fast.ai's and FFCV's progressive resizing;
EfficientNetV2's progressive learning). The size grows linearly from `start_scale` x the input size at
the first epoch to the full size at `full_at` of the epochs; the remaining epochs run at the full size, so
BatchNorm's statistics and the last weights are those of the resolution the model is evaluated at.

Only the image batch is resized (bilinear, antialiased), after augmentation and normalisation, so the
loaders, the device augmentation and the targets stay as they are: SSDLite's boxes are normalised to the
image, and DeepLab's loss upsamples its logits to the full-size target mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProgressiveResize:
    start_scale: float = 0.5   # the first epoch's side, as a fraction of the input size
    full_at: float = 0.75      # the fraction of the epochs after which every epoch runs at the input size
    multiple: int = 32         # sides are rounded to a multiple of the backbone's largest stride

    def __post_init__(self):
        if not 0 < self.start_scale <= 1:
            raise ValueError(f"progressive_resize.start_scale={self.start_scale} must be in (0, 1]: the first "
                             f"epoch's image side as a fraction of the input size.")
        if not 0 <= self.full_at <= 1:
            raise ValueError(f"progressive_resize.full_at={self.full_at} must be in [0, 1]: the fraction of the "
                             f"epochs after which training runs at the full input size.")
        if self.multiple < 1:
            raise ValueError(f"progressive_resize.multiple={self.multiple} must be a positive number of pixels.")

    def full_from(self, epochs: int) -> int:
        """The first (0-based) epoch at the full input size; the last epoch always is."""
        return min(epochs - 1, math.ceil(self.full_at * epochs))

    def size(self, epoch: int, epochs: int, input_size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) epoch `epoch` (0-based) of `epochs` trains at."""
        full_from = self.full_from(epochs)
        if epoch >= full_from:
            return tuple(input_size)
        scale = self.start_scale + (1.0 - self.start_scale) * epoch / full_from
        return tuple(min(side, max(self.multiple, round(side * scale / self.multiple) * self.multiple))
                     for side in input_size)

    def mean_area(self, epochs: int, input_size: tuple[int, int]) -> float:
        """The run's mean image area as a fraction of the input size's: about its share of the compute."""
        full = input_size[0] * input_size[1]
        return sum(h * w for h, w in (self.size(e, epochs, input_size) for e in range(epochs))) / (epochs * full)


def resize_batch(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """images [B, C, H, W] float -> [B, C, *size]; unchanged when already that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def progressive_resize_from_config(spec) -> ProgressiveResize | None:
    """The config's `progressive_resize` mapping (or null) -> ProgressiveResize; a bad entry is a ConfigError."""
    from tasks.errors import ConfigError

    if spec is None:
        return None
    known = [f.name for f in fields(ProgressiveResize)]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ConfigError(f"progressive_resize has unknown keys {unknown}; expected some of {known}, or "
                          f"progressive_resize=null to train every epoch at the input size.")
    try:
        return ProgressiveResize(**spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None
