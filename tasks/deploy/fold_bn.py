"""Fold BatchNorm into the convolution before it, for inference.

In eval mode BN is an affine map per channel, y = (x - mean) / sqrt(var + eps) * gamma + beta, so a
conv followed by BN is one conv with W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps).
Only a Conv2d that is directly followed by a BatchNorm2d inside an nn.Sequential is folded (ConvBNAct
is one); in a Sequential the order of the children is the order of execution, elsewhere it may not be.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from backbones.layers import Fp32DepthwiseConv2d

# Convs whose forward is nn.Conv2d's in eval: Fp32DepthwiseConv2d differs only under CPU autocast (training)
FOLDABLE_CONVS = (nn.Conv2d, Fp32DepthwiseConv2d)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to `bn(conv(x))` with `bn` in eval mode; computed in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False).")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"cannot fold {bn} into {conv}: {bn.num_features} BN channels for "
                         f"{conv.out_channels} conv output channels.")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - mean) * scale + beta)
    return fused


def _fold_in_place(module: nn.Module) -> int:
    count = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if type(conv) in FOLDABLE_CONVS and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fold_conv_bn(conv, bn)
                module._modules[second] = nn.Identity()
                count += 1
    for child in module.children():
        count += _fold_in_place(child)
    return count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every Conv2d -> BatchNorm2d pair (in a Sequential) folded into
    one conv with bias; the BN is replaced by nn.Identity, so module names and indices stay the same.
    The original is left untouched. `model.folded_batchnorms` tells how many pairs were folded."""
    folded = copy.deepcopy(model).eval()
    folded.folded_batchnorms = _fold_in_place(folded)
    return folded


__all__ = ["fold_batchnorm", "fold_conv_bn"]
