"""DeepLab's training geometry (random scale, pad, random crop, flip) painted on the device, image and mask.

The CPU pipeline (tasks/segmentation/transforms.py) resizes the photo by the drawn scale with OpenCV
(INTER_LINEAR for the image, INTER_NEAREST for the mask), pads it bottom/right with the mean colour (the mask
with ignore), cuts the crop window and maybe flips it. Every output pixel therefore comes from one position of
the scaled photo, or from the padding: each axis is a list of source taps per output pixel, which is all
that is built here (the scaled photo and the padded canvas never exist). The image uses OpenCV's two taps
and 1/2048 weights (tasks.detection.device_geometry.linear_taps) in its fixed-point arithmetic: a horizontal
integer pass, then the vectorised vertical pass; the mask uses OpenCV's nearest-neighbour index,
min(floor(q / (m / n)), n - 1), exactly. Photos of several sizes share one batch, padded to the largest.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasks.detection.device_geometry import RESIZE_COEF_SCALE, linear_taps


@dataclass
class AxisTaps:
    """One axis of a resample, per image b and output pixel k: the two source pixels and their integer weights
    (in 1/2048) for the image, the source pixel for the mask, and whether the output pixel lies on the photo."""

    left: torch.Tensor  # int64 [B, S]
    right: torch.Tensor
    w_left: torch.Tensor  # int32 [B, S]
    w_right: torch.Tensor
    nearest: torch.Tensor  # int64 [B, S]
    valid: torch.Tensor  # bool [B, S]


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(device)


def axis_taps(positions: torch.Tensor, sources: Sequence[int], scaled: Sequence[int], vertical: bool) -> AxisTaps:
    """positions [B, S] float64: the pixel of the scaled photo (sources[b] pixels resized to scaled[b]) each output
    pixel shows; outside 0..scaled[b]-1 it shows the padding. `vertical`: OpenCV's row axis (edge weights kept)."""
    device = positions.device
    n, m = _column(sources, device), _column(scaled, device)
    valid = (positions >= 0) & (positions < m[:, None])
    q = torch.where(valid, positions, 0.0)
    no_fallback = torch.zeros_like(n, dtype=torch.bool)
    left, right, w_left, w_right = linear_taps(q, n, m, no_fallback, clamp_weights=not vertical)
    # cv::resize INTER_NEAREST: inv_scale = m / n (double), source = floor(q * (1 / inv_scale)), clamped
    nearest = torch.minimum(torch.floor(q * (1.0 / (m / n))[:, None]), n[:, None] - 1)
    return AxisTaps(left.to(torch.int64), right.to(torch.int64), (w_left * RESIZE_COEF_SCALE).to(torch.int32),
                    (w_right * RESIZE_COEF_SCALE).to(torch.int32), nearest.to(torch.int64), valid)


def _gather(values: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """values[..., index[b, k], ...] along `dim` (2 or 3 of [B, C, H, W]), index [B, S]."""
    shape = list(values.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0], 1, 1, 1]
    view[dim] = index.shape[1]
    return torch.gather(values, dim, index.view(view).expand(shape))


def resample(images: torch.Tensor, masks: torch.Tensor, y: AxisTaps, x: AxisTaps, fill: torch.Tensor,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [B, 3, H, W], masks uint8 [B, H, W] -> uint8 [B, 3, Sy, Sx] and [B, Sy, Sx]: OpenCV's uint8
    INTER_LINEAR at the taps (horizontal pass D = p0 * a0 + p1 * a1, then ((D0 >> 4) * b0 >> 16) +
    ((D1 >> 4) * b1 >> 16) + 2 >> 2), INTER_NEAREST for the masks; `fill` / ignore_index off the photo."""
    pixels = images.to(torch.int32)
    rows = (_gather(pixels, 3, x.left) * x.w_left[:, None, None, :]
            + _gather(pixels, 3, x.right) * x.w_right[:, None, None, :])
    out = (((_gather(rows, 2, y.left) >> 4) * y.w_left[:, None, :, None]) >> 16) \
        + (((_gather(rows, 2, y.right) >> 4) * y.w_right[:, None, :, None]) >> 16)
    out = ((out + 2) >> 2).clamp(0, 255).to(torch.uint8)
    on_photo = y.valid[:, :, None] & x.valid[:, None, :]  # [B, Sy, Sx]
    fill = fill.to(device=images.device, dtype=torch.uint8).view(1, 3, 1, 1)
    out = torch.where(on_photo[:, None], out, fill)
    labels = _gather(_gather(masks[:, None], 3, x.nearest), 2, y.nearest)[:, 0]
    return out, torch.where(on_photo, labels, torch.full_like(labels, ignore_index))


def scale_pad_crop_flip(images: torch.Tensor, masks: torch.Tensor, sizes: Sequence[tuple[int, int]],
                        params: Sequence[dict], crop: int | tuple[int, int], fill: torch.Tensor, ignore_index: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo b ([:, :h, :w] of the padded batch, sizes[b] = (h, w)) scaled to (scaled_h, scaled_w), padded at
    (pad_top, pad_left), the crop window (crop_h, crop_w; an int: square) at (x1, y1) cut and flipped when flip
    -> uint8 images [B, 3, crop_h, crop_w] and masks [B, crop_h, crop_w]."""
    device = images.device
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    k_rows = torch.arange(crop_h, dtype=torch.float64, device=device)[None]
    k = torch.arange(crop_w, dtype=torch.float64, device=device)[None]
    flips = _column([p["flip"] for p in params], device)[:, None] > 0
    rows = k_rows + _column([p["y1"] - p["pad_top"] for p in params], device)[:, None]
    cols = torch.where(flips, crop_w - 1 - k, k) + _column([p["x1"] - p["pad_left"] for p in params], device)[:, None]
    y = axis_taps(rows, [h for h, _ in sizes], [p["scaled_h"] for p in params], vertical=True)
    x = axis_taps(cols, [w for _, w in sizes], [p["scaled_w"] for p in params], vertical=False)
    return resample(images, masks, y, x, fill, ignore_index)


def resize_to(images: torch.Tensor, masks: torch.Tensor, sizes: Sequence[tuple[int, int]],
              targets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """cv2.resize of photo b from sizes[b] to targets[b] (INTER_LINEAR, masks INTER_NEAREST), as the CPU path's
    base_size step; the results padded (zeros) to the largest target."""
    device = images.device
    height, width = max(t[0] for t in targets), max(t[1] for t in targets)
    rows = torch.arange(height, dtype=torch.float64, device=device)[None].expand(len(sizes), -1)
    cols = torch.arange(width, dtype=torch.float64, device=device)[None].expand(len(sizes), -1)
    y = axis_taps(rows, [h for h, _ in sizes], [t[0] for t in targets], vertical=True)
    x = axis_taps(cols, [w for _, w in sizes], [t[1] for t in targets], vertical=False)
    return resample(images, masks, y, x, torch.zeros(3), 0)


__all__ = ["AxisTaps", "axis_taps", "resample", "resize_to", "scale_pad_crop_flip"]
