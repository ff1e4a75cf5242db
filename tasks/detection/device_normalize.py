"""Normalisation after the transfer: the loader hands uint8 images (4x fewer bytes to collate, pin and copy,
no float pass on the CPU) and the device normalises them exactly as albumentations' Normalize would have.

Albumentations normalises uint8 images through a per-channel lookup table; the table here is made by
running that same Normalize over every value 0..255, so the device's results are the CPU path's, bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[3, 256] float32: what A.Normalize(mean, std, max_pixel_value=255) maps each uint8 value of each channel to."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
    out = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0, p=1.0)(image=values)["image"]
    return torch.from_numpy(np.ascontiguousarray(out[0].T, dtype=np.float32))


class DeviceNormalize:
    """uint8 [B, 3, H, W] (any device, any memory format) -> float32 normalised, on the same device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.table = normalization_table(self.mean, self.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceNormalize takes uint8 images [B, 3, H, W]; got {images.dtype} "
                             f"{tuple(images.shape)}.")
        if self.table.device != images.device:
            self.table = self.table.to(images.device)
        # one gather per channel: table[c][value]; the offsets c * 256 index the flattened table
        offsets = torch.arange(3, device=images.device, dtype=torch.int64).view(1, 3, 1, 1) * 256
        return self.table.view(-1)[images.long() + offsets]

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"


__all__ = ["DeviceNormalize", "normalization_table"]
