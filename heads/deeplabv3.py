"""DeepLabv3 segmentation head: ASPP, or the light head of Mobile DeepLabv3, classifier, loss, decode.

Light head (MobileNetV2 paper, sec. 6.3, "Mobile DeepLabv3"): a 1x1 conv branch and an image-pooling
branch, concatenated, projected by a 1x1 conv, then a 1x1 classifier. Full ASPP (DeepLabv3, sec. 3.3):
the same plus three 3x3 atrous branches. Every conv but the classifier is conv (no bias) + BN + ReLU.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import FeatureInfo
from backbones.layers import ConvBNAct

# DeepLabv3 uses rates (6, 12, 18) at output stride 16 and doubles them at 8; the rates scale with
# 1/stride so that they cover the same image area.
REFERENCE_RATES = (6, 12, 18)
REFERENCE_STRIDE = 16


def default_atrous_rates(stride: int) -> tuple[int, ...]:
    """(6, 12, 18) at output stride 16, (12, 24, 36) at 8, (3, 6, 9) at 32."""
    return tuple(max(1, r * REFERENCE_STRIDE // stride) for r in REFERENCE_RATES)


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv + BN + ReLU -> upsampled back to the input's size."""

    def __init__(self, in_channels: int, out_channels: int, norm):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = ConvBNAct(in_channels, out_channels, 1, act=nn.ReLU, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Parallel branches (1x1, 3x3 atrous per rate, image pooling), concatenated, 1x1-projected.

    With no rates this is the light head of Mobile DeepLabv3.
    """

    def __init__(self, in_channels: int, out_channels: int, atrous_rates: Sequence[int],
                 image_pooling: bool, norm):
        super().__init__()
        branches: list[nn.Module] = [ConvBNAct(in_channels, out_channels, 1, act=nn.ReLU, norm=norm)]
        for rate in atrous_rates:
            branches.append(ConvBNAct(in_channels, out_channels, 3, dilation=rate, act=nn.ReLU, norm=norm))
        if image_pooling:
            branches.append(ImagePooling(in_channels, out_channels, norm))
        self.branches = nn.ModuleList(branches)
        self.project = ConvBNAct(len(branches) * out_channels, out_channels, 1, act=nn.ReLU, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """Mobile DeepLabv3 head. `num_classes` INCLUDES background (VOC: 21).

    `refine_3x3` adds the 3x3 conv (256) + BN + ReLU that torchvision's `DeepLabHead` puts between
    ASPP and the classifier; neither the DeepLabv3 paper nor TF's release has it, and the MobileNetV2
    paper's Table 7 counts exclude it, so it is off by default.
    """

    def __init__(
        self,
        feature_info: Mapping[str, FeatureInfo],
        num_classes: int,
        in_features: Sequence[str] = ("C5",),
        aspp: bool = False,
        aspp_channels: int = 256,
        atrous_rates: Sequence[int] | None = None,
        image_pooling: bool = True,
        dropout: float = 0.1,
        ignore_index: int = 255,
        norm_eps: float = 1e-5,
        norm_momentum: float = 0.1,
        refine_3x3: bool = False,
    ):
        super().__init__()
        in_features = tuple(in_features)
        if len(in_features) != 1:
            raise ValueError(f"head.in_features={list(in_features)} must name exactly one feature map "
                             f"(DeepLabv3 has no decoder).")
        name = in_features[0]
        if name not in feature_info:
            raise ValueError(f"head.in_features asks for '{name}', which the backbone does not return; "
                             f"it returns {sorted(feature_info)}.")
        if num_classes < 2:
            raise ValueError(f"head.num_classes={num_classes} must be >= 2 (it counts background).")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head.dropout={dropout} must be in [0, 1).")
        info = feature_info[name]
        if aspp:
            rates = tuple(atrous_rates) if atrous_rates is not None else default_atrous_rates(info.stride)
            if any(int(r) < 1 for r in rates):
                raise ValueError(f"head.atrous_rates={list(rates)} must all be positive integers.")
        else:
            if atrous_rates:
                raise ValueError(f"head.atrous_rates={list(atrous_rates)} is set but head.aspp is false; "
                                 f"the light head has no atrous branches.")
            rates = ()
        self.in_feature = name
        self.stride = info.stride
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.atrous_rates = tuple(int(r) for r in rates)
        norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)

        self.aspp = ASPP(info.channels, aspp_channels, self.atrous_rates, image_pooling, norm)
        self.dropout = nn.Dropout(dropout)
        self.refine = (ConvBNAct(aspp_channels, aspp_channels, 3, act=nn.ReLU, norm=norm)
                       if refine_3x3 else nn.Identity())
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1, bias=True)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.dropout(self.aspp(features[self.in_feature]))
        return {"logits": self.classifier(self.refine(x))}

    def loss(self, outputs: Mapping[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
        """Cross-entropy of the logits upsampled (bilinear) to each target mask's size.

        `targets` is a list of {"mask": int64 [H, W]} or a tensor [B, H, W]. The mean runs over the
        pixels that are not `ignore_index`; a batch with none gives a zero loss, not NaN.
        """
        logits = outputs["logits"]
        masks = [t["mask"] for t in targets] if not torch.is_tensor(targets) else list(targets)
        if len(masks) != logits.shape[0]:
            raise ValueError(f"loss got {len(masks)} target masks for a batch of {logits.shape[0]} images.")
        total = logits.new_zeros(())
        valid = 0
        if len({tuple(m.shape) for m in masks}) == 1:
            groups = [(logits, torch.stack(masks))]
        else:
            groups = [(logits[i:i + 1], m[None]) for i, m in enumerate(masks)]
        for group_logits, group_masks in groups:
            group_masks = group_masks.to(device=logits.device, dtype=torch.long)
            up = F.interpolate(group_logits, size=group_masks.shape[-2:], mode="bilinear", align_corners=False)
            total = total + F.cross_entropy(up.float(), group_masks, ignore_index=self.ignore_index,
                                            reduction="sum")
            valid += int((group_masks != self.ignore_index).sum())
        return {"loss_seg": total / max(valid, 1)}

    @torch.no_grad()
    def predict(self, outputs: Mapping[str, torch.Tensor], image_sizes: Sequence[Sequence[int]],
                input_size: Sequence[int] | None = None,
                valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image {"mask": int64 [h, w]} for each (h, w) in `image_sizes` (see `logits_to_label_maps`)."""
        return logits_to_label_maps(outputs["logits"], image_sizes, input_size, valid_sizes)


@torch.no_grad()
def logits_to_label_maps(logits: torch.Tensor, image_sizes: Sequence[Sequence[int]],
                         input_size: Sequence[int] | None = None,
                         valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Logits [B, K, h', w'] -> per image {"mask": int64 [h, w]}; also the ONNX Runtime path's decoder.

    Without `input_size`, the logits are taken to cover the whole image (a plain resize), and are
    upsampled straight to (h, w). With `input_size` (H, W of the network input) and `valid_sizes`
    (the top-left region of the input that holds each image, as the eval transforms pad bottom and
    right), the logits are upsampled to the input, cropped to that region, then resized to (h, w).
    """
    if len(image_sizes) != logits.shape[0]:
        raise ValueError(f"predict got {len(image_sizes)} image sizes for a batch of {logits.shape[0]}.")
    if (input_size is None) != (valid_sizes is None):
        raise ValueError("predict needs both input_size and valid_sizes, or neither.")
    results = []
    for i, size in enumerate(image_sizes):
        h, w = (int(s) for s in size)
        x = logits[i:i + 1].float()
        if input_size is not None:
            target = tuple(int(s) for s in input_size)
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            vh, vw = (int(s) for s in valid_sizes[i])
            x = x[..., :vh, :vw]
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        results.append({"mask": x[0].argmax(0).to(torch.int64)})
    return results

__all__ = ["DeepLabV3Head", "ASPP", "ImagePooling", "default_atrous_rates", "logits_to_label_maps"]
