"""MobileNetV2 (Sandler et al., 2018) as its Table 2 lists it."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Backbone, FeatureInfo, tail_dilation_plan
from .layers import ConvBNAct, InvertedResidual, make_divisible

STEM = (3, 32, 2)  # kernel, channels, stride
LAST_CONV = 1280

# Table 2: expansion t, output channels c, repeats n, stride s of the first repeat.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(Backbone):
    """MobileNetV2 body with named taps C2..C5 (and `C5` = the 1280 conv when `last_conv`).

    C4 is the expansion output of the first stride-2 bottleneck after stride 16 (576 channels at
    width 1.0): its expansion still runs at stride 16, and this is the tap SSDLite reads
    ("layer_15/expansion_output" in TF's object detection API).
    """

    def __init__(self, width_mult: float = 1.0, output_stride: int = 32,
                 out_features: Sequence[str] | None = None, last_conv: bool = True,
                 round_nearest: int = 8, norm_eps: float = 1e-5, norm_momentum: float = 0.1,
                 pretrained: str | None = None):
        super().__init__(out_features, output_stride)
        if width_mult <= 0:
            raise ValueError(f"backbone.width_mult={width_mult} must be > 0.")
        self.width_mult = width_mult
        self.last_conv_enabled = last_conv

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c, eps=norm_eps, momentum=norm_momentum)

        kernel, stem_channels, stem_stride = STEM
        in_ch = make_divisible(stem_channels * width_mult, round_nearest)
        self.stem = ConvBNAct(3, in_ch, kernel, stem_stride, act=nn.ReLU6, norm=norm)

        layer_specs = [(t, c, s if i == 0 else 1) for t, c, n, s in STAGES for i in range(n)]
        plan = tail_dilation_plan([s for _, _, s in layer_specs], output_stride, stem_stride)
        blocks, stride_so_far = [], stem_stride
        last_at_stride: dict[int, tuple[int, int]] = {}
        self._c4_block: int | None = None
        for i, ((t, c, _), (stride, dilation)) in enumerate(zip(layer_specs, plan)):
            out_ch = make_divisible(c * width_mult, round_nearest)
            block = InvertedResidual(in_ch, out_ch, stride, t, dilation, norm=norm)
            nominal_stride_before = stride_so_far
            if layer_specs[i][2] == 2 and self._c4_block is None and _nominal(layer_specs, i) == 16:
                self._c4_block = i
                self._all_feature_info["C4"] = FeatureInfo(block.hidden_channels, nominal_stride_before)
            stride_so_far *= stride
            last_at_stride[_nominal(layer_specs, i + 1)] = (i, out_ch)
            blocks.append(block)
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self._c2_block, c2_ch = last_at_stride[4]
        self._c3_block, c3_ch = last_at_stride[8]
        self._all_feature_info["C2"] = FeatureInfo(c2_ch, 4)
        self._all_feature_info["C3"] = FeatureInfo(c3_ch, 8)

        if last_conv:
            last_ch = make_divisible(LAST_CONV * max(1.0, width_mult), round_nearest)
            self.last_conv = ConvBNAct(in_ch, last_ch, 1, act=nn.ReLU6, norm=norm)
            in_ch = last_ch
        else:
            self.last_conv = None
        self._all_feature_info["C5"] = FeatureInfo(in_ch, stride_so_far)
        self.num_features = in_ch
        self._check_out_features()
        if pretrained:
            from .weights import load_pretrained
            load_pretrained(self, pretrained)

    def materialized_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(images)
        taps = {self._c2_block: "C2", self._c3_block: "C3"}
        features = {}
        for i, block in enumerate(self.blocks):
            if i == self._c4_block:
                x, features["C4"] = block.forward_with_expansion(x)
            else:
                x = block(x)
            if i in taps:
                features[taps[i]] = x
        if self.last_conv is not None:
            x = self.last_conv(x)
        features["C5"] = x
        return features


def _nominal(layer_specs, upto: int) -> int:
    """The undilated stride of the input to layer `upto` (after the stride-2 stem)."""
    stride = 2
    for _, _, s in layer_specs[:upto]:
        stride *= s
    return stride
