"""Strided and dilated depthwise convs stay in fp32 under CPU autocast; nothing else about the layers changes."""
import torch
import torch.nn.functional as F

from backbones import MobileNetV1, MobileNetV2
from backbones.layers import ConvBNAct, Fp32DepthwiseConv2d


def test_only_strided_and_dilated_depthwise_convs_get_the_fp32_layer():
    assert type(ConvBNAct(32, 32, 3, stride=2, groups=32).conv) is Fp32DepthwiseConv2d
    assert type(ConvBNAct(32, 32, 3, stride=1, dilation=2, groups=32).conv) is Fp32DepthwiseConv2d
    assert type(ConvBNAct(32, 32, 3, stride=1, groups=32).conv) is torch.nn.Conv2d
    assert type(ConvBNAct(32, 64, 3, stride=2).conv) is torch.nn.Conv2d
    assert type(ConvBNAct(32, 64, 3, dilation=6).conv) is torch.nn.Conv2d  # ASPP's atrous convs are full convs
    # MobileNetV2: the 4 stride-2 bottlenecks' depthwise convs (the first block's stride-2 conv is a full conv)
    strided = [m for m in MobileNetV2().modules() if isinstance(m, Fp32DepthwiseConv2d)]
    assert [m.in_channels for m in strided] == [96, 144, 192, 576]
    assert len([m for m in MobileNetV1().modules() if isinstance(m, Fp32DepthwiseConv2d)]) == 4
    # output stride 16: the last stride-2 block keeps stride 1 at dilation 1, the three after it dilate by 2
    os16 = [(m.in_channels, m.stride, m.dilation) for m in MobileNetV2(output_stride=16).modules()
            if isinstance(m, Fp32DepthwiseConv2d)]
    assert os16 == [(96, (2, 2), (1, 1)), (144, (2, 2), (1, 1)), (192, (2, 2), (1, 1))] + [(960, (1, 1), (2, 2))] * 3


def test_under_cpu_autocast_the_conv_runs_in_fp32_and_hands_bf16_on():
    torch.manual_seed(0)
    layer = Fp32DepthwiseConv2d(8, 8, 3, 2, 1, groups=8, bias=False)
    x = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x.bfloat16())
        plain = F.conv2d(x.bfloat16(), layer.weight, None, 2, 1, 1, 8)  # what nn.Conv2d would do here
    expected = F.conv2d(x.bfloat16().float(), layer.weight, None, 2, 1, 1, 8).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert plain.dtype == torch.bfloat16 and not torch.equal(plain, expected)  # bf16 weights: rounded differently
    # gradients flow to the fp32 weights and the bf16 input
    x16 = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x16).float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x16.grad.dtype == torch.bfloat16
    # outside autocast: exactly nn.Conv2d, same state dict
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, None, 2, 1, 1, 8), rtol=0, atol=0)
    assert list(layer.state_dict()) == ["weight"]
