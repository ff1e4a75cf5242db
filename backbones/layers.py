"""The building blocks shared by the MobileNet backbones and the heads."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

ActFactory = Callable[[], nn.Module] | None


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `value` to the nearest multiple of `divisor`, never going more than 10% below it.

    This is the rounding the MobileNetV2 paper and its TF release use for width multipliers.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Fp32DepthwiseConv2d(nn.Conv2d):
    """A strided or dilated depthwise conv that stays in fp32 under CPU autocast.

    oneDNN's bf16 backward of these is slower than its fp32 one, while the plain stride-1 depthwise convs
    and every other layer gain from bf16 (one thread, torch 2.14):
    - strided: ~12x (batch 16, 96 channels, 160x160 -> 80x80); in MobileNetV2 + SSDLite these few layers
      took ~35% of a bf16 training step;
    - dilated (DeepLab's output stride 16 and 8): 2-3x, and worse, in channels_last its weight gradient
      reads memory it never wrote: it came out right only while that memory was fresh zero pages from the
      system, and was NaN with reused memory (`cpu_memory=reuse`, tests/test_cpu_memory.py).
    The weights, the state dict and everything outside CPU autocast are those of nn.Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).to(dtype)  # the BN and activation after it stay in bf16
        return super().forward(x)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation, with 'same' padding for odd kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        act: ActFactory = nn.ReLU6,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        padding = (kernel_size - 1) // 2 * dilation
        depthwise = groups > 1 and groups == in_channels == out_channels
        conv = Fp32DepthwiseConv2d if depthwise and (stride > 1 or dilation > 1) else nn.Conv2d
        layers = OrderedDict(
            conv=conv(in_channels, out_channels, kernel_size, stride, padding,
                      dilation=dilation, groups=groups, bias=False),
            bn=norm(out_channels),
        )
        if act is not None:
            layers["act"] = act()
            if hasattr(layers["act"], "inplace"):
                # on the BN output, which nothing else reads: no new tensor per activation, about 4% of an
                # SSDLite training step on CPU (an out-of-place ReLU6 allocates and writes the whole map)
                layers["act"].inplace = True
        super().__init__(layers)
        self.out_channels = out_channels


class DepthwiseSeparable(nn.Sequential):
    """MobileNetV1's block: 3x3 depthwise conv + BN + act, then 1x1 pointwise conv + BN + act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 act: ActFactory = nn.ReLU, norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__(OrderedDict(
            dw=ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels, dilation=dilation,
                         act=act, norm=norm),
            pw=ConvBNAct(in_channels, out_channels, 1, act=act, norm=norm),
        ))
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """MobileNetV2's bottleneck: 1x1 expansion (t) -> 3x3 depthwise -> linear 1x1 projection.

    The residual connection exists only where input and output shapes match. `forward` can also
    return the expansion output, which is where SSDLite attaches its first prediction layer.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 dilation: int = 1, norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = (ConvBNAct(in_channels, hidden, 1, act=nn.ReLU6, norm=norm)
                       if expand_ratio != 1 else nn.Identity())
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, dilation=dilation,
                            act=nn.ReLU6, norm=norm)
        self.project = ConvBNAct(hidden, out_channels, 1, act=None, norm=norm)
        self.hidden_channels = hidden
        self.out_channels = out_channels

    def forward_with_expansion(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expanded = self.expand(x)
        out = self.project(self.dw(expanded))
        if self.use_residual:
            out = out + x
        return out, expanded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_expansion(x)[0]
