"""MobileNetV1 (Howard et al., 2017) as its Table 1 lists it."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Backbone, FeatureInfo, tail_dilation_plan
from .layers import ConvBNAct, DepthwiseSeparable

STEM = (3, 32, 2)  # kernel, channels, stride: a full 3x3 conv

# Table 1, one row per depthwise-separable block: (stride of the depthwise conv, pointwise channels).
# The paper prints stride 2 for the last depthwise conv; at 7x7 input that is a misprint
# (its output stays 7x7), as every released implementation agrees.
BLOCKS = (
    (1, 64),
    (2, 128), (1, 128),
    (2, 256), (1, 256),
    (2, 512), (1, 512), (1, 512), (1, 512), (1, 512), (1, 512),
    (2, 1024), (1, 1024),
)

# Named taps: the index of the block whose output each level is (0-based, in BLOCKS).
# C4 is "conv11" (Conv2d_11_pointwise in TF's naming), the last 512-channel block.
TAPS = {"C2": 2, "C3": 4, "C4": 10, "C5": 12}

# The paper's Table 1 uses ReLU; TF-slim's release (and so timm's weights) uses ReLU6.
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def v1_channels(channels: int, width_mult: float, min_depth: int = 8) -> int:
    return max(int(channels * width_mult), min_depth)


class MobileNetV1(Backbone):
    def __init__(self, width_mult: float = 1.0, output_stride: int = 32,
                 out_features: Sequence[str] | None = None, min_depth: int = 8,
                 act: str = "relu", norm_eps: float = 1e-5, norm_momentum: float = 0.1,
                 pretrained: str | None = None):
        super().__init__(out_features, output_stride)
        if width_mult <= 0:
            raise ValueError(f"backbone.width_mult={width_mult} must be > 0.")
        if act not in ACTIVATIONS:
            raise ValueError(f"backbone.act={act!r} is not supported; expected one of {sorted(ACTIVATIONS)}.")
        activation = ACTIVATIONS[act]
        self.width_mult = width_mult

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c, eps=norm_eps, momentum=norm_momentum)

        kernel, stem_channels, stem_stride = STEM
        in_ch = v1_channels(stem_channels, width_mult, min_depth)
        self.stem = ConvBNAct(3, in_ch, kernel, stem_stride, act=activation, norm=norm)
        plan = tail_dilation_plan([s for s, _ in BLOCKS], output_stride, initial_stride=stem_stride)
        blocks, stride_so_far = [], stem_stride
        for i, ((_, channels), (stride, dilation)) in enumerate(zip(BLOCKS, plan)):
            out_ch = v1_channels(channels, width_mult, min_depth)
            blocks.append(DepthwiseSeparable(in_ch, out_ch, stride, dilation, act=activation, norm=norm))
            stride_so_far *= stride
            for name, index in TAPS.items():
                if index == i:
                    self._all_feature_info[name] = FeatureInfo(out_ch, stride_so_far)
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.num_features = in_ch
        self._check_out_features()
        if pretrained:
            from .weights import load_pretrained
            load_pretrained(self, pretrained)

    def materialized_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(images)
        names = {index: name for name, index in TAPS.items()}
        features = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in names:
                features[names[i]] = x
        return features
