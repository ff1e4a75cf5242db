"""SSD box coding: offsets of a box relative to a default box, scaled by the variances (weights)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


class BoxCoder:
    """Encode xyxy boxes against cxcywh default boxes as (10 dx, 10 dy, 5 log dw, 5 log dh).

    The weights (10, 10, 5, 5) are the inverse of SSD's "variances" (0.1, 0.1, 0.2, 0.2): torchvision's
    SSD BoxCoder and TF's FasterRcnnBoxCoder(scale_factors=[10, 10, 5, 5]). All tensors broadcast over
    leading dims, so a whole batch [B, A, 4] is coded in one call.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 wh_clip: float = math.log(1000.0 / 16)):
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"head.box_coder_weights={tuple(weights)} must be four positive numbers.")
        self.weights = tuple(float(w) for w in weights)
        self.wh_clip = wh_clip  # torchvision's bound on exp() inputs when decoding

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """boxes: xyxy [..., 4]; anchors: cxcywh [..., 4] -> codes [..., 4]."""
        wx, wy, ww, wh = self.weights
        cx, cy, w, h = xyxy_to_cxcywh(boxes).unbind(-1)
        acx, acy, aw, ah = anchors.unbind(-1)
        return torch.stack((wx * (cx - acx) / aw, wy * (cy - acy) / ah,
                            ww * torch.log(w / aw), wh * torch.log(h / ah)), dim=-1)

    def decode(self, codes: Tensor, anchors: Tensor) -> Tensor:
        """codes [..., 4]; anchors: cxcywh [..., 4] -> xyxy boxes [..., 4] in the anchors' units."""
        wx, wy, ww, wh = self.weights
        dx, dy, dw, dh = codes.unbind(-1)
        acx, acy, aw, ah = anchors.to(codes.dtype).unbind(-1)
        cx = dx / wx * aw + acx
        cy = dy / wy * ah + acy
        w = torch.exp(torch.clamp(dw / ww, max=self.wh_clip)) * aw
        h = torch.exp(torch.clamp(dh / wh, max=self.wh_clip)) * ah
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
