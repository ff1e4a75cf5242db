"""albumentations' uint8 colour jitters (ColorJitter's brightness, contrast, saturation, hue) on batches of
device tensors, one factor per image, uint8 in and out as on the CPU.

Each follows albumentations 2.x / albucore / OpenCV arithmetic: float32 lookup tables clipped and truncated
(brightness, contrast), OpenCV's fixed-point RGB -> grey, cv2.addWeighted's float32 blend rounded
(saturation), OpenCV's fixed-point RGB -> HSV and its vectorised float32 HSV -> RGB, truncated (hue).
tests/test_device_augment.py states how close each one is.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# OpenCV's RGB -> grey for uint8 (fixed point, 15 bits in its vectorised path)
R2Y, G2Y, B2Y, YUV_SHIFT = 9798, 19235, 3735, 15
HSV_SHIFT = 12  # OpenCV's RGB -> HSV for uint8 (fixed point, 12 bits)


def _factors(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(device, non_blocking=True)


def _values(device: torch.device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.float32, device=device)


def _lookup(images: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """images uint8 [B, ...], tables [B, 256] -> tables[b][images[b]]."""
    flat = images.reshape(images.shape[0], -1).to(torch.int64)
    return torch.gather(tables, 1, flat).view(images.shape)


def grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] RGB -> int32 [B, H, W], as cv2.cvtColor(RGB2GRAY)."""
    x = images.to(torch.int32)
    return (x[:, 0] * R2Y + x[:, 1] * G2Y + x[:, 2] * B2Y + (1 << (YUV_SHIFT - 1))) >> YUV_SHIFT


def adjust_brightness(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """adjust_brightness_torchvision: a table of float32(value * factor), clipped to 0..255 and truncated."""
    f = _factors(factors, images.device).to(torch.float32)
    tables = (_values(images.device)[None] * f[:, None]).clamp(0, 255).to(torch.uint8)
    return _lookup(images, tables)


def adjust_contrast(images: torch.Tensor, factors: Sequence[float],
                    pixels: Sequence[int] | None = None) -> torch.Tensor:
    """adjust_contrast_torchvision: a table of float32(value * factor) + mean * (1 - factor) (float64), clipped
    and truncated; mean = the grey image's mean over its `pixels` first pixels (black padding adds nothing)."""
    f = _factors(factors, images.device)
    count = _factors(pixels if pixels is not None else [images.shape[2] * images.shape[3]] * len(f), images.device)
    mean = grey(images).sum(dim=(1, 2), dtype=torch.int64).to(torch.float64) / count
    scaled = (_values(images.device)[None] * f.to(torch.float32)[:, None]).to(torch.float64)
    tables = (scaled + (mean * (1.0 - f))[:, None]).clamp(0, 255).to(torch.uint8)
    return _lookup(images, tables)


def adjust_saturation(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """adjust_saturation_torchvision: cv2.addWeighted(image, f, grey, 1 - f, 0), float32, rounded."""
    f = _factors(factors, images.device)
    alpha = f.to(torch.float32).view(-1, 1, 1, 1)
    beta = (1.0 - f).to(torch.float32).view(-1, 1, 1, 1)
    g = grey(images).to(torch.float32).unsqueeze(1)
    return (images.to(torch.float32) * alpha + g * beta).round().clamp(0, 255).to(torch.uint8)


def _division_table(numerator: int, scale: float, device: torch.device) -> torch.Tensor:
    """OpenCV's saturate_cast<int>(numerator / (scale * i)) for i in 0..255 (0 at i = 0), rounded half up."""
    i = torch.arange(256, dtype=torch.float64, device=device)
    return torch.where(i > 0, torch.floor(numerator / (scale * i.clamp(min=1)) + 0.5), 0).to(torch.int32)


def rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, H, W] -> int32 h (0..179), s, v (0..255) [B, H, W], as OpenCV's RGB2HSV for uint8."""
    r, g, b = images.to(torch.int32).unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (HSV_SHIFT - 1)
    sdiv = _division_table(255 << HSV_SHIFT, 1.0, images.device)
    hdiv = _division_table(180 << HSV_SHIFT, 6.0, images.device)
    s = (diff * sdiv[v.long()] + half) >> HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff.long()] + half) >> HSV_SHIFT
    return torch.where(h < 0, h + 180, h), s, v


# OpenCV's sector table gives (b, g, r) indices into (v, v(1-s), v(1-sf), v(1-s(1-f))); here as (r, g, b)
SECTORS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV's vectorised HSV2RGB for uint8 (float32 steps, truncated): h 0..179, s, v 0..255 [B, H, W] ->
    uint8 [B, 3, H, W]. (OpenCV rounds instead for the few pixels its vector loop leaves at a row's end.)"""
    f32 = torch.float32
    hf = h.to(f32) * torch.tensor(6.0 / 180.0, dtype=f32)
    sf = s.to(f32) * torch.tensor(1.0 / 255.0, dtype=f32)
    vf = v.to(f32) * torch.tensor(1.0 / 255.0, dtype=f32)
    sector = torch.trunc(hf)
    frac = hf - sector
    one = torch.ones((), dtype=f32, device=h.device)
    tab = torch.stack([vf, vf * (one - sf), vf * (one - sf * frac), vf * (one - sf * (one - frac))], 1)
    picks = torch.tensor(SECTORS, device=h.device)[sector.to(torch.int64) % 6].permute(0, 3, 1, 2)
    rgb = torch.gather(tab, 1, picks) * torch.tensor(255.0, dtype=f32)
    return torch.trunc(rgb).clamp(0, 255).to(torch.uint8)


def adjust_hue(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """adjust_hue_torchvision: HSV, hue through a table of (value + 180 * factor) mod 180 (float64, truncated),
    back to RGB."""
    h, s, v = rgb_to_hsv(images)
    f = _factors(factors, images.device)
    tables = torch.remainder(torch.arange(256, dtype=torch.float64, device=images.device)[None]
                             + 180.0 * f[:, None], 180.0).to(torch.int64)
    return hsv_to_rgb(_lookup(h, tables), s, v)


JITTERS = (("brightness", adjust_brightness, 1.0), ("contrast", adjust_contrast, 1.0),
           ("saturation", adjust_saturation, 1.0), ("hue", adjust_hue, 0.0))


def photometric(images: torch.Tensor, factors: dict[str, Sequence[float]], pixels: Sequence[int],
                orders: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The four jitters in the CPU pipeline's order, in place, each on the images whose factor is not the
    identity (known on the host: no device sync). `pixels`: each image's own pixel count (padding aside).
    `orders[b]`: the order in which image b's jitters run, as indices into JITTERS (ColorJitter draws one per
    image); None: JITTERS' own order for every image."""
    orders = [range(len(JITTERS))] * images.shape[0] if orders is None else orders
    for position in range(len(JITTERS)):
        for jitter, (name, adjust, identity) in enumerate(JITTERS):
            fired = [i for i, f in enumerate(factors[name]) if f != identity and orders[i][position] == jitter]
            if not fired:
                continue
            index = torch.tensor(fired, device=images.device)
            chosen = [factors[name][i] for i in fired]
            extra = {"pixels": [pixels[i] for i in fired]} if name == "contrast" else {}
            images.index_copy_(0, index, adjust(images.index_select(0, index), chosen, **extra))
    return images


__all__ = ["adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "grey", "hsv_to_rgb",
           "photometric", "rgb_to_hsv"]
