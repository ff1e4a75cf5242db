"""SSD's training augmentation painted on the device: "the CPU draws, the device paints".

With `build_detection_transforms(..., device_augment=True)` the loader's workers only decode the photo and
draw every random parameter with the CPU pipeline's own transforms and seeded streams (tasks/detection/
augment_plan.py); the boxes are transformed there, by the same code as on the CPU path. The worker hands
the untouched uint8 photo (any size) and a small parameter record. `DeviceAugment` then applies, per image
and in the CPU pipeline's order, on whatever device the batch is on:

- photometric distortion: albumentations' uint8 brightness, contrast, saturation and hue (its lookup tables,
  OpenCV's fixed-point grey and HSV conversions), rounded and clipped to uint8 after each step;
- zoom-out, IoU crop, flip and the square resize in one separable linear map: the crop window is cut
  from the virtual zoom-out canvas (never built: the fill colour's share is added in closed form), and
  resized with OpenCV's weights (INTER_AREA's exact pixel overlaps when shrinking, bilinear otherwise);
- the lookup-table normalisation of DeviceNormalize.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasks.detection.device_normalize import DeviceNormalize

# One parameter record per image (float64): photometric factors (identity when a jitter did not fire), the
# zoom-out canvas and the image's offset in it, the crop window in canvas pixels, and the flip.
PARAMS = ("brightness", "contrast", "saturation", "hue", "canvas_h", "canvas_w", "top", "left",
          "x1", "y1", "x2", "y2", "flip")
P = {name: i for i, name in enumerate(PARAMS)}


@dataclass
class PlannedImage:
    """What a worker hands over for one image: the decoded photo (uint8 HWC) and its parameter record."""

    pixels: torch.Tensor
    params: torch.Tensor


@dataclass
class PlannedBatch:
    """A batch of PlannedImages: photos of any size, parameters [B, len(PARAMS)] (kept on the CPU)."""

    pixels: list[torch.Tensor]
    params: torch.Tensor

    @classmethod
    def collate(cls, images: Sequence[PlannedImage]) -> PlannedBatch:
        return cls([im.pixels for im in images], torch.stack([im.params for im in images]))

    def pin_memory(self) -> PlannedBatch:  # DataLoader(pin_memory=True) calls this
        return PlannedBatch([p.pin_memory() for p in self.pixels], self.params)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PlannedBatch:
        return PlannedBatch([p.to(device, non_blocking=non_blocking) for p in self.pixels], self.params)

    def __len__(self) -> int:
        return len(self.pixels)


# OpenCV's RGB -> grey for uint8 (fixed point, 15 bits)
R2Y, G2Y, B2Y, YUV_SHIFT = 9798, 19235, 3735, 15
HSV_SHIFT = 12  # OpenCV's RGB -> HSV for uint8 (fixed point, 12 bits)
RESIZE_COEF_SCALE = 2048  # OpenCV's uint8 bilinear weights are multiples of 1/2048


def grey(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] RGB -> int32 [H, W], as cv2.cvtColor(RGB2GRAY)."""
    x = image.to(torch.int32)
    return (x[0] * R2Y + x[1] * G2Y + x[2] * B2Y + (1 << (YUV_SHIFT - 1))) >> YUV_SHIFT


def _lookup(image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[image.to(torch.int64)]


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """albumentations' adjust_brightness_torchvision on uint8: a float32 table, clipped and truncated."""
    if factor == 1.0:
        return image
    values = torch.arange(256, dtype=torch.float32, device=image.device)
    table = (values * torch.tensor(factor, dtype=torch.float32)).clamp(0, 255).to(torch.uint8)
    return _lookup(image, table)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """albumentations' adjust_contrast_torchvision on uint8: blend towards the grey image's mean, via a table
    (float32 products, float64 offset, clipped and truncated, as albucore's multiply_add)."""
    if factor == 1.0:
        return image
    g = grey(image)
    mean = g.sum(dtype=torch.int64).to(torch.float64) / g.numel()
    values = torch.arange(256, dtype=torch.float32, device=image.device)
    scaled = (values * torch.tensor(factor, dtype=torch.float32)).to(torch.float64)
    table = (scaled + mean * (1.0 - factor)).clamp(0, 255).to(torch.uint8)
    return _lookup(image, table)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """albumentations' adjust_saturation_torchvision on uint8: cv2.addWeighted(image, f, grey, 1 - f, 0)."""
    if factor == 1.0:
        return image
    g = grey(image).to(torch.float32)
    alpha = torch.tensor(factor, dtype=torch.float32)
    beta = torch.tensor(1.0 - factor, dtype=torch.float32)
    return (image.to(torch.float32) * alpha + g * beta).round().clamp(0, 255).to(torch.uint8)


def _rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [3, H, W] -> int32 h (0..179), s, v (0..255), as OpenCV's RGB2HSV for uint8."""
    r, g, b = image.to(torch.int32)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    i = torch.arange(256, dtype=torch.float64, device=image.device)
    # OpenCV's division tables: saturate_cast<int> rounds half away from zero; all values here are positive
    sdiv = torch.where(i > 0, torch.floor((255 << HSV_SHIFT) / i.clamp(min=1) + 0.5), 0).to(torch.int32)
    hdiv = torch.where(i > 0, torch.floor((180 << HSV_SHIFT) / (6.0 * i.clamp(min=1)) + 0.5), 0).to(torch.int32)
    half = 1 << (HSV_SHIFT - 1)
    s = (diff * sdiv[v.long()] + half) >> HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff.long()] + half) >> HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV's vectorised HSV2RGB for uint8 (float32 steps, truncated): h 0..179, s, v 0..255 -> uint8 [3, H, W].
    (OpenCV rounds instead of truncating for the few pixels at the end of a row its vector loop leaves over.)"""
    hf = h.to(torch.float32) * torch.tensor(6.0 / 180.0, dtype=torch.float32)
    sf = s.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    vf = v.to(torch.float32) * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    sector = torch.trunc(hf)
    frac = hf - sector
    one = torch.ones((), dtype=torch.float32, device=h.device)
    tab = torch.stack([vf, vf * (one - sf), vf * (one - sf * frac), vf * (one - sf * (one - frac))])  # [4, H, W]
    # OpenCV's sector table gives (b, g, r) indices into tab; reordered here to (r, g, b)
    order = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=h.device)
    picks = order[sector.to(torch.int64) % 6].permute(2, 0, 1)  # [3, H, W]
    rgb = torch.gather(tab, 0, picks) * torch.tensor(255.0, dtype=torch.float32)
    return torch.trunc(rgb).clamp(0, 255).to(torch.uint8)


def adjust_hue(image: torch.Tensor, factor: float) -> torch.Tensor:
    """albumentations' adjust_hue_torchvision on uint8: HSV, hue shifted by 180 * factor modulo 180 (a uint8
    table, truncated), back to RGB."""
    if factor == 0.0:
        return image
    h, s, v = _rgb_to_hsv(image)
    values = torch.arange(256, dtype=torch.float64, device=image.device)
    table = torch.remainder(values + 180.0 * factor, 180.0).to(torch.int32)
    return _hsv_to_rgb(table[h.long()], s, v)


def photometric(image: torch.Tensor, params: Sequence[float]) -> torch.Tensor:
    """The four jitters in the CPU pipeline's order (brightness, contrast, saturation, hue)."""
    image = adjust_brightness(image, params[P["brightness"]])
    image = adjust_contrast(image, params[P["contrast"]])
    image = adjust_saturation(image, params[P["saturation"]])
    return adjust_hue(image, params[P["hue"]])


def resize_weights(n_in: int, n_out: int, mode: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n_out, n_in] float64: OpenCV's uint8 resize along one axis as a matrix (each row sums to 1).

    "area": INTER_AREA when shrinking (each output pixel averages the input pixels it covers, by overlap);
    "linear": INTER_LINEAR (half-pixel centres, edges clamped, weights in 1/2048);
    "area_linear": INTER_AREA when the other axis grows (OpenCV's linear fallback with area-style weights).
    """
    scale = n_in / n_out
    dst = torch.arange(n_out, dtype=torch.float64, device=device)
    src = torch.arange(n_in, dtype=torch.float64, device=device)
    if mode == "area":
        start = dst * scale
        end = start + scale
        overlap = (torch.minimum(end[:, None], src[None, :] + 1) - torch.maximum(start[:, None], src[None, :]))
        cell = torch.clamp(n_in - start, max=scale)
        return overlap.clamp(min=0) / cell[:, None]
    if mode == "linear":
        f = ((dst + 0.5) * scale - 0.5).to(torch.float32).to(torch.float64)
        left = torch.floor(f)
        frac = f - left
    elif mode == "area_linear":
        left = torch.floor(dst * scale)
        frac = (dst + 1) - (left + 1) * (n_out / n_in)
        frac = torch.where(frac <= 0, torch.zeros_like(frac), frac - torch.floor(frac))
    else:
        raise ValueError(f"resize mode must be 'area', 'linear' or 'area_linear', got {mode!r}.")
    below, beyond = left < 0, left >= n_in - 1
    frac = torch.where(below | beyond, torch.zeros_like(frac), frac)
    left = left.clamp(0, n_in - 1)
    w_right = torch.round(frac * RESIZE_COEF_SCALE) / RESIZE_COEF_SCALE
    w_left = torch.round((1 - frac) * RESIZE_COEF_SCALE) / RESIZE_COEF_SCALE
    weights = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    rows = torch.arange(n_out, device=device)
    weights[rows, left.long()] += w_left
    weights[rows, (left + 1).clamp(max=n_in - 1).long()] += w_right
    return weights


def resize_modes(crop_h: int, crop_w: int, size: int) -> tuple[str, str] | None:
    """(rows, columns) modes of albumentations' Resize(size, size, area_for_downscale="image"); None: no resize.
    INTER_AREA as soon as either side shrinks; OpenCV's exact area path only when neither side grows."""
    if (crop_h, crop_w) == (size, size):
        return None
    if size < crop_h or size < crop_w:
        if size <= crop_h and size <= crop_w:
            return "area", "area"
        return "area_linear", "area_linear"
    return "linear", "linear"


def zoom_crop_flip_resize(image: torch.Tensor, params: Sequence[float], size: int,
                          fill: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [3, size, size] of whole uint8 levels: the image placed on its zoom-out
    canvas (filled with `fill`), the crop window cut out, flipped, resized to size x size."""
    _, height, width = image.shape
    top, left = int(params[P["top"]]), int(params[P["left"]])
    x1, y1, x2, y2 = (int(params[P[k]]) for k in ("x1", "y1", "x2", "y2"))
    flip = bool(params[P["flip"]])
    crop_h, crop_w = y2 - y1, x2 - x1
    # the crop window in image pixels, and the part of it the image covers (the rest is canvas fill)
    rows = (max(y1 - top, 0), min(y2 - top, height))
    cols = (max(x1 - left, 0), min(x2 - left, width))
    fill = fill.to(device=image.device, dtype=torch.float32).view(3, 1, 1)
    modes = resize_modes(crop_h, crop_w, size)
    if modes is None:  # no resize: paste the visible part into a fill-coloured crop
        out = fill.expand(3, crop_h, crop_w).clone()
        if rows[1] > rows[0] and cols[1] > cols[0]:
            out[:, rows[0] + top - y1:rows[1] + top - y1, cols[0] + left - x1:cols[1] + left - x1] = (
                image[:, rows[0]:rows[1], cols[0]:cols[1]].to(torch.float32))
        return out.flip(2) if flip else out
    wy = resize_weights(crop_h, size, modes[0], image.device)
    wx = resize_weights(crop_w, size, modes[1], image.device)
    if flip:  # flipping the crop = reversing the order of the columns it is resized from
        wx = wx.flip(1)
    # every output pixel = its weights on visible pixels + the rest of its weight times the fill colour
    total = wy.sum(1)[:, None] * wx.sum(1)[None, :]
    out = fill * total.to(torch.float32)
    if rows[1] > rows[0] and cols[1] > cols[0]:
        wy_vis = wy[:, rows[0] + top - y1:rows[1] + top - y1]
        wx_vis = wx[:, cols[0] + left - x1:cols[1] + left - x1]
        visible = wy_vis.sum(1)[:, None] * wx_vis.sum(1)[None, :]
        part = image[:, rows[0]:rows[1], cols[0]:cols[1]].to(torch.float32)
        part = wy_vis.to(torch.float32) @ part @ wx_vis.to(torch.float32).T
        out = out - fill * visible.to(torch.float32) + part
    return out.round().clamp(0, 255)


class DeviceAugment:
    """PlannedBatch (on any device) -> float32 normalised [B, 3, size, size] on that device."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], photometric: bool = True):
        self.size = int(size)
        self.photometric = photometric
        self.normalize = DeviceNormalize(mean, std)
        # ZoomOut's canvas colour on uint8 images: the mean, rounded
        self.fill = torch.tensor([float(round(255.0 * m)) for m in mean], dtype=torch.float32)

    def augment_uint8(self, batch: PlannedBatch) -> torch.Tensor:
        """uint8 [B, 3, size, size]: the augmented images before normalisation."""
        if not isinstance(batch, PlannedBatch) or len(batch) == 0:
            raise ValueError(f"DeviceAugment takes a non-empty PlannedBatch; got {type(batch).__name__}.")
        out = []
        for pixels, params in zip(batch.pixels, batch.params.tolist(), strict=True):
            if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3:
                raise ValueError(f"planned images must be uint8 [H, W, 3]; got {pixels.dtype} {tuple(pixels.shape)}.")
            image = pixels.permute(2, 0, 1)
            if self.photometric:
                image = photometric(image, params)
            out.append(zoom_crop_flip_resize(image, params, self.size, self.fill))
        return torch.stack(out).to(torch.uint8)

    def __call__(self, batch: PlannedBatch) -> torch.Tensor:
        return self.normalize(self.augment_uint8(batch))

    def __repr__(self) -> str:
        return f"DeviceAugment(size={self.size}, normalize={self.normalize!r})"


__all__ = ["DeviceAugment", "PARAMS", "PlannedBatch", "PlannedImage", "adjust_brightness", "adjust_contrast",
           "adjust_hue", "adjust_saturation", "resize_weights", "zoom_crop_flip_resize"]
