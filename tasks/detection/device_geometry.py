"""SSD's zoom-out, IoU crop, flip and square resize as one separable linear map per image, batched.

The CPU pipeline places the photo on a canvas up to 4x larger per side filled with the mean colour, cuts the
crop window out of it, maybe flips it, and resizes it to size x size with OpenCV (albumentations' Resize with
area_for_downscale="image": INTER_AREA as soon as either side shrinks, INTER_LINEAR otherwise). Each output
pixel is a weighted sum of crop pixels, separably per axis; here the weights are built directly for the
photo's own pixels (the canvas is never built) and the fill colour gets the remaining weight in closed form.
INTER_AREA is computed in float32 like OpenCV's; INTER_LINEAR (and INTER_AREA's linear fallback) in
OpenCV's own fixed-point integer arithmetic. A crop of exactly size x size (no resize) comes out exact.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

RESIZE_COEF_SCALE = 2048  # OpenCV's uint8 bilinear weights are multiples of 1/2048
AREA, LINEAR, AREA_LINEAR = 0, 1, 2  # per-image resize modes (identity = LINEAR at scale 1)
MODE_NAMES = {"area": AREA, "linear": LINEAR, "area_linear": AREA_LINEAR}


def resize_mode(crop_h: int, crop_w: int, size: int) -> int:
    """albumentations' Resize(size, size, area_for_downscale="image") in OpenCV: INTER_AREA when either side
    shrinks, whose exact area path needs neither side to grow (else its linear fallback, "area_linear");
    INTER_LINEAR otherwise (a crop already size x size is left as it is: LINEAR at scale 1 is the identity)."""
    if size < crop_h or size < crop_w:
        return AREA if size <= crop_h and size <= crop_w else AREA_LINEAR
    return LINEAR


def _linear_taps(n: torch.Tensor, size: int, fallback: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """OpenCV's two-tap resize of n[b] pixels to `size`: for each output pixel [B, size] the left and right
    source pixels and their weights (multiples of 1/2048). INTER_LINEAR (half-pixel centres), or where
    fallback[b], INTER_AREA's linear fallback; edges clamped."""
    d = torch.arange(size, dtype=torch.float64, device=n.device)[None]
    return linear_taps(d, n, torch.full_like(n, float(size)), fallback)


def linear_taps(d: torch.Tensor, n: torch.Tensor, size: torch.Tensor, fallback: torch.Tensor,
                clamp_weights: bool = True) -> tuple[torch.Tensor, ...]:
    """_linear_taps at given output positions d [B, S] (float64) of a resize of n[b] pixels to size[b].
    clamp_weights=False: OpenCV's vertical axis, whose weights keep their fraction at the edges while both
    taps are clamped to the same edge row (its two truncated products then lose up to 1 level there)."""
    scale, n1, size1 = (n / size)[:, None], n[:, None], size[:, None]
    f = ((d + 0.5) * scale - 0.5).to(torch.float32).to(torch.float64)
    left_fallback = torch.floor(d * scale)
    frac_fallback = (d + 1) - (left_fallback + 1) * (size1 / n1)
    frac_fallback = torch.where(frac_fallback <= 0, 0.0, frac_fallback - torch.floor(frac_fallback))
    left = torch.where(fallback[:, None], left_fallback, torch.floor(f))
    frac = torch.where(fallback[:, None], frac_fallback, f - torch.floor(f))
    if clamp_weights:
        frac = torch.where((left < 0) | (left >= n1 - 1), 0.0, frac)
        left = torch.minimum(left.clamp(min=0), n1 - 1)
        right = torch.minimum(left + 1, n1 - 1)
    else:
        left, right = torch.minimum(left.clamp(min=0), n1 - 1), torch.minimum((left + 1).clamp(min=0), n1 - 1)
    w_right = torch.round(frac * RESIZE_COEF_SCALE) / RESIZE_COEF_SCALE
    w_left = torch.round((1 - frac) * RESIZE_COEF_SCALE) / RESIZE_COEF_SCALE
    return left, right, w_left, w_right


def axis_weights(pos: torch.Tensor, valid: torch.Tensor, n: torch.Tensor, size: int,
                 modes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's uint8 resize of n[b] crop pixels to `size` along one axis, as weights on given crop positions.

    pos [B, L] float64: the crop coordinate of each photo pixel along the axis; valid [B, L]: the photo pixel
    lies inside the crop; modes[b]: AREA, LINEAR or AREA_LINEAR. Returns the weights [B, size, L] float64 and
    each output pixel's total weight over the whole crop [B, size] (1, but for OpenCV's 1/2048 rounding).
    """
    device = pos.device
    c = pos[:, None, :]  # [B, 1, L]
    is_area = torch.tensor([m == AREA for m in modes]).to(device)
    weights = total = None
    if any(m == AREA for m in modes):  # INTER_AREA: each output pixel averages the pixels it covers, by overlap
        d = torch.arange(size, dtype=torch.float64, device=device)[None, :, None]
        scale = (n / size)[:, None, None]
        start = d * scale
        cell = torch.minimum(n[:, None, None] - start, scale)
        weights = (torch.minimum(start + scale, c + 1) - torch.maximum(start, c)).clamp(min=0) / cell
        total = torch.ones(len(modes), size, dtype=torch.float64, device=device)
    if any(m != AREA for m in modes):
        fallback = torch.tensor([m == AREA_LINEAR for m in modes]).to(device)
        left, right, w_left, w_right = _linear_taps(n, size, fallback)
        linear = w_left[..., None] * (c == left[..., None]) + w_right[..., None] * (c == right[..., None])
        weights = linear if weights is None else torch.where(is_area[:, None, None], weights, linear)
        total = w_left + w_right if total is None else torch.where(is_area[:, None], total, w_left + w_right)
    return torch.where(valid[:, None, :], weights, 0.0), total


def resize_weights(n_in: int, n_out: int, mode: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n_out, n_in] float64: OpenCV's uint8 resize along one axis as a matrix; mode "area", "linear" or
    "area_linear" (see resize_mode)."""
    if mode not in MODE_NAMES:
        raise ValueError(f"resize mode must be one of {sorted(MODE_NAMES)}, got {mode!r}.")
    pos = torch.arange(n_in, dtype=torch.float64, device=device)[None]
    n = torch.tensor([float(n_in)], dtype=torch.float64, device=device)
    return axis_weights(pos, torch.ones_like(pos, dtype=torch.bool), n, n_out, [MODE_NAMES[mode]])[0][0]


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(device)[:, None]


def _photo_axis(length: int, offsets: Sequence[int], starts: Sequence[int], crops: Sequence[int],
                lengths: Sequence[int], flips: Sequence[bool], device: torch.device):
    """Crop coordinates [B, length] of each photo pixel along one axis (padded photos), and which are inside."""
    j = torch.arange(length, dtype=torch.float64, device=device)[None]
    n = _column(crops, device)
    pos = j + _column(offsets, device) - _column(starts, device)
    valid = (pos >= 0) & (pos < n) & (j < _column(lengths, device))
    pos = torch.where(_column(flips, device) > 0, n - 1 - pos, pos)
    return pos, valid, n[:, 0]


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Matrix products in true float32: no autocast, no TF32 (its 11-bit inputs would move INTER_AREA's
    fractional weights by up to ~0.1 level; the fixed-point path's integers are exact either way)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _resize_area(images: torch.Tensor, wy: torch.Tensor, total_y: torch.Tensor, wx: torch.Tensor,
                 total_x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """INTER_AREA (OpenCV: float sums, rounded): every output pixel = its weights on photo pixels + the rest
    of its weight times the fill colour."""
    rest = total_y[:, :, None] * total_x[:, None, :] - wy.sum(2)[:, :, None] * wx.sum(2)[:, None, :]
    wy, wx = wy.to(torch.float32), wx.to(torch.float32)
    photo = torch.matmul(torch.matmul(wy[:, None], images.to(torch.float32)), wx.transpose(1, 2)[:, None])
    return (photo + fill.view(1, 3, 1, 1) * rest.to(torch.float32)[:, None]).round().clamp(0, 255)


def _resize_fixed_point(images: torch.Tensor, wx: torch.Tensor, total_x: torch.Tensor, taps_y: tuple,
                        first_row: torch.Tensor, heights: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """INTER_LINEAR on uint8 as OpenCV computes it: an integer horizontal pass (weights in 1/2048), then its
    vectorised vertical pass, ((D0 >> 4) * b0 >> 16) + ((D1 >> 4) * b1 >> 16) + 2 >> 2. Rows of the crop
    outside the photo are fill rows. first_row[b]: the photo row at crop row 0 (negative: fill above)."""
    scale = float(RESIZE_COEF_SCALE)
    wx_int = wx * scale
    fill_x = (total_x - wx.sum(2)) * scale  # [B, S] the fill colour's weight in each output column
    # integer-valued and below 2^24 (255 * 2048): exact in float32
    rows = torch.matmul(images.to(torch.float32), wx_int.to(torch.float32).transpose(1, 2)[:, None])
    rows = rows.to(torch.int64) + (fill.view(1, 3, 1, 1) * fill_x[:, None, None, :]).to(torch.int64)
    fill_row = (fill.view(1, 3, 1) * (total_x * scale)[:, None, :]).to(torch.int64)  # [B, 3, S]
    out = torch.full_like(rows[:, :, :1, :].expand(-1, -1, wx.shape[1], -1), 2)
    for source, weight in ((taps_y[0], taps_y[2]), (taps_y[1], taps_y[3])):
        photo_row = source + first_row[:, None]  # [B, S]
        inside = (photo_row >= 0) & (photo_row < heights[:, None])
        index = photo_row.clamp(0, images.shape[2] - 1).to(torch.int64)[:, None, :, None].expand(-1, 3, -1,
                                                                                                  rows.shape[3])
        picked = torch.where(inside[:, None, :, None], torch.gather(rows, 2, index), fill_row[:, :, None, :])
        out = out + (((picked >> 4) * (weight * scale).to(torch.int64)[:, None, :, None]) >> 16)
    return (out >> 2).clamp(0, 255).to(torch.float32)


def zoom_crop_flip_resize(images: torch.Tensor, sizes: Sequence[tuple[int, int]], params: Sequence[dict],
                          size: int, fill: torch.Tensor) -> torch.Tensor:
    """images uint8 [B, 3, Hm, Wm] (photo b in the top-left sizes[b] = (h, w), the rest ignored), params[b]
    with canvas offset (top, left), crop window (x1, y1, x2, y2) in canvas pixels and flip -> float32
    [B, 3, size, size] of whole uint8 levels."""
    device = images.device
    fill = fill.to(device=device, dtype=torch.float32)
    crop_h = [p["y2"] - p["y1"] for p in params]
    crop_w = [p["x2"] - p["x1"] for p in params]
    modes = [resize_mode(h, w, size) for h, w in zip(crop_h, crop_w, strict=True)]
    pos_x, valid_x, n_x = _photo_axis(images.shape[3], [p["left"] for p in params], [p["x1"] for p in params],
                                      crop_w, [w for _, w in sizes], [p["flip"] for p in params], device)
    wx, total_x = axis_weights(pos_x, valid_x, n_x, size, modes)
    out = torch.empty(len(params), 3, size, size, dtype=torch.float32, device=device)
    with full_float32(device):
        _resize_into(out, images, sizes, params, modes, crop_h, wx, total_x, size, fill)
    return out


def _resize_into(out: torch.Tensor, images: torch.Tensor, sizes: Sequence[tuple[int, int]], params: Sequence[dict],
                 modes: Sequence[int], crop_h: Sequence[float], wx: torch.Tensor, total_x: torch.Tensor, size: int,
                 fill: torch.Tensor) -> None:
    """Fills out[b] for each image: the INTER_AREA ones in float32, the others in OpenCV's fixed point."""
    device = images.device
    area = [i for i, m in enumerate(modes) if m == AREA]
    if area:
        index = torch.tensor(area, device=device)
        pos_y, valid_y, n_y = _photo_axis(images.shape[2], [params[i]["top"] for i in area],
                                          [params[i]["y1"] for i in area], [crop_h[i] for i in area],
                                          [sizes[i][0] for i in area], [False] * len(area), device)
        wy, total_y = axis_weights(pos_y, valid_y, n_y, size, [AREA] * len(area))
        out.index_copy_(0, index, _resize_area(images.index_select(0, index), wy, total_y, wx.index_select(0, index),
                                               total_x.index_select(0, index), fill))
    linear = [i for i, m in enumerate(modes) if m != AREA]
    if linear:
        index = torch.tensor(linear, device=device)
        n_y = torch.tensor([float(crop_h[i]) for i in linear], dtype=torch.float64).to(device)
        fallback = torch.tensor([modes[i] == AREA_LINEAR for i in linear]).to(device)
        taps_y = _linear_taps(n_y, size, fallback)
        first_row = torch.tensor([float(params[i]["y1"] - params[i]["top"]) for i in linear],
                                 dtype=torch.float64).to(device)
        heights = torch.tensor([float(sizes[i][0]) for i in linear], dtype=torch.float64).to(device)
        out.index_copy_(0, index, _resize_fixed_point(images.index_select(0, index), wx.index_select(0, index),
                                                      total_x.index_select(0, index), taps_y, first_row, heights,
                                                      fill))


__all__ = ["axis_weights", "linear_taps", "resize_mode", "resize_weights", "zoom_crop_flip_resize"]
