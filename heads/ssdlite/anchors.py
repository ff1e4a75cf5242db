"""SSD default boxes in normalised (cx, cy, w, h), laid out per map as (H, W, boxes) like the predictors."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def linear_scales(num_maps: int, min_scale: float, max_scale: float) -> list[float]:
    """SSD's s_k = s_min + (s_max - s_min) k / (m - 1), plus 1.0 for the last map's extra box."""
    if num_maps == 1:
        return [min_scale, max_scale]
    step = max_scale - min_scale
    return [min_scale + step * k / (num_maps - 1.0) for k in range(num_maps)] + [1.0]


class DefaultBoxes:
    """The default boxes of SSD (Liu et al. 2016, section 2.2) for any set of feature-map sizes.

    Per location of map k: (s_k, ratio 1), (sqrt(s_k s_k+1), ratio 1), then r and 1/r for each r in
    `aspect_ratios` (torchvision's DefaultBoxGenerator order). With `reduced_first_map` (TF object
    detection API's `reduce_boxes_in_lowest_layer`) the first map has only (first_map_scale, 1),
    (s_0, r_0), (s_0, 1/r_0). Boxes are (w, h) = (s sqrt(r), s / sqrt(r)) in image-normalised units;
    `clip` clamps w and h to [0, 1] as torchvision does. Results are cached per map sizes.
    """

    def __init__(self, num_maps: int, min_scale: float = 0.2, max_scale: float = 0.95,
                 aspect_ratios: Sequence[float] = (2.0, 3.0), reduced_first_map: bool = True,
                 first_map_scale: float = 0.1, clip: bool = True):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"head.min_scale={min_scale} and head.max_scale={max_scale} must satisfy "
                             "0 < min_scale <= max_scale.")
        if any(r <= 0 for r in aspect_ratios):
            raise ValueError(f"head.aspect_ratios={list(aspect_ratios)} must all be positive.")
        if reduced_first_map and not aspect_ratios:
            raise ValueError("head.reduced_first_map=true needs at least one entry in head.aspect_ratios.")
        self.num_maps = num_maps
        self.scales = linear_scales(num_maps, min_scale, max_scale)
        self.clip = clip
        self.wh_pairs = [self._wh_pairs(k, aspect_ratios, reduced_first_map, first_map_scale)
                         for k in range(num_maps)]
        self._cache: dict[tuple, Tensor] = {}

    def _wh_pairs(self, k: int, ratios: Sequence[float], reduced: bool, first_scale: float) -> Tensor:
        s_k = self.scales[k]
        if k == 0 and reduced:
            r = math.sqrt(ratios[0])
            pairs = [[first_scale, first_scale], [s_k * r, s_k / r], [s_k / r, s_k * r]]
        else:
            s_prime = math.sqrt(s_k * self.scales[k + 1])
            pairs = [[s_k, s_k], [s_prime, s_prime]]
            for ratio in ratios:
                r = math.sqrt(ratio)
                pairs += [[s_k * r, s_k / r], [s_k / r, s_k * r]]
        wh = torch.as_tensor(pairs, dtype=torch.float32)
        return wh.clamp(0.0, 1.0) if self.clip else wh

    def num_anchors_per_location(self) -> list[int]:
        return [len(wh) for wh in self.wh_pairs]

    def __call__(self, grid_sizes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
        """[A, 4] normalised cx, cy, w, h for maps of the given (H, W), in predictor order."""
        if len(grid_sizes) != self.num_maps:
            raise ValueError(f"SSDLite expects {self.num_maps} feature maps, got {len(grid_sizes)}.")
        key = (tuple((int(h), int(w)) for h, w in grid_sizes), dtype, torch.device(device))
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not tracing and key in self._cache:
            return self._cache[key]
        boxes = torch.cat([self._grid(h, w, wh, device) for (h, w), wh in zip(key[0], self.wh_pairs)])
        boxes = boxes.to(dtype)
        if not tracing:
            self._cache[key] = boxes
        return boxes

    @staticmethod
    def _grid(h: int, w: int, wh: Tensor, device: torch.device) -> Tensor:
        # Same arithmetic as torchvision (centres (i + 0.5) / size in float32), so boxes match bit for bit.
        cx = (torch.arange(w, device=device) + 0.5) / w
        cy = (torch.arange(h, device=device) + 0.5) / h
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=-1)  # [HW, 2], row-major
        n = wh.shape[0]
        centres = centres[:, None, :].expand(-1, n, 2)
        sizes = wh.to(device)[None].expand(centres.shape[0], n, 2)
        return torch.cat((centres, sizes), dim=-1).reshape(-1, 4)
