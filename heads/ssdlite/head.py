"""SSDLite (MobileNetV2 paper, section 6.2): SSD with depthwise-separable extra layers and predictors."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backbones.base import FeatureInfo
from backbones.layers import ConvBNAct

from .anchors import DefaultBoxes
from .box_coder import BoxCoder
from .loss import multibox_loss
from .postprocess import postprocess


def _extra_block(in_channels: int, depth: int, norm) -> nn.Sequential:
    """1x1 to depth/2, 3x3 depthwise stride 2, 1x1 to depth; each + BN + ReLU6 (TF's ssdlite extras)."""
    mid = depth // 2
    return nn.Sequential(OrderedDict(
        reduce=ConvBNAct(in_channels, mid, 1, norm=norm),
        dw=ConvBNAct(mid, mid, 3, stride=2, groups=mid, norm=norm),
        expand=ConvBNAct(mid, depth, 1, norm=norm),
    ))


def _predictor(in_channels: int, out_channels: int, norm) -> nn.Sequential:
    """3x3 depthwise + BN + ReLU6, then a 1x1 conv with bias (torchvision's _prediction_block)."""
    return nn.Sequential(OrderedDict(
        dw=ConvBNAct(in_channels, in_channels, 3, groups=in_channels, norm=norm),
        proj=nn.Conv2d(in_channels, out_channels, 1),
    ))


class SSDLiteHead(nn.Module):
    """SSDLite on the backbone maps named in `in_features` plus extra maps built on the last one.

    forward(features) -> {"cls_logits": [B, A, K+1] (index 0 = background), "bbox_regression": [B, A, 4]
    (codes against the anchors), "anchors": [A, 4] normalised cx, cy, w, h}. `num_classes` counts
    object classes; predict() returns labels 0..K-1.
    """

    def __init__(
        self,
        feature_info: dict[str, FeatureInfo],
        num_classes: int,
        in_features: Sequence[str] = ("C4", "C5"),
        extra_depths: Sequence[int] = (512, 256, 256, 128),
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (2.0, 3.0),
        reduced_first_map: bool = True,
        first_map_scale: float = 0.1,
        clip_anchors: bool = True,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        min_negatives_per_image: int = 3,
        score_threshold: float = 0.01,
        nms_iou_threshold: float = 0.55,
        topk_candidates: int = 300,
        detections_per_image: int = 100,
        nms_pre: int | None = 1000,
        norm_eps: float = 1e-3,
        norm_momentum: float = 0.03,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 (object classes, no background).")
        in_features = tuple(in_features)
        missing = [name for name in in_features if name not in feature_info]
        if not in_features or missing:
            raise ValueError(f"head.in_features={list(in_features)} asks for {missing or 'nothing'}; the "
                             f"backbone provides {sorted(feature_info)}.")
        if any(d < 2 for d in extra_depths):
            raise ValueError(f"head.extra_depths={list(extra_depths)} must all be >= 2.")
        self.in_features = in_features
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.min_negatives_per_image = min_negatives_per_image
        self.score_threshold = score_threshold
        self.nms_iou_threshold = nms_iou_threshold
        self.topk_candidates = topk_candidates
        self.detections_per_image = detections_per_image
        if nms_pre is not None and nms_pre < 0:
            raise ValueError(f"head.nms_pre={nms_pre} must be a positive number of candidates, or null for no cap.")
        self.nms_pre = nms_pre
        self.box_coder = BoxCoder(tuple(box_coder_weights))

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c, eps=norm_eps, momentum=norm_momentum)

        channels = [feature_info[name].channels for name in in_features]
        extras = []
        for depth in extra_depths:
            extras.append(_extra_block(channels[-1], depth, norm))
            channels.append(depth)
        self.extra_layers = nn.ModuleList(extras)

        self.default_boxes = DefaultBoxes(len(channels), min_scale, max_scale, tuple(aspect_ratios),
                                          reduced_first_map, first_map_scale, clip_anchors)
        boxes = self.default_boxes.num_anchors_per_location()
        self.cls_predictors = nn.ModuleList(
            _predictor(c, n * (num_classes + 1), norm) for c, n in zip(channels, boxes))
        self.box_predictors = nn.ModuleList(_predictor(c, n * 4, norm) for c, n in zip(channels, boxes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # TF's ssdlite configs and torchvision's SSDLite: conv weights ~ N(0, 0.03), biases 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.03)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @staticmethod
    def _flatten(x: Tensor, columns: int) -> Tensor:
        # [B, boxes * C, H, W] -> [B, H * W * boxes, C]: per map, locations row-major then boxes.
        n, _, h, w = x.shape
        return x.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        maps = [features[name] for name in self.in_features]
        x = maps[-1]
        for block in self.extra_layers:
            x = block(x)
            maps.append(x)
        cls_logits = torch.cat([self._flatten(p(m), self.num_classes + 1)
                                for p, m in zip(self.cls_predictors, maps)], dim=1)
        bbox_regression = torch.cat([self._flatten(p(m), 4) for p, m in zip(self.box_predictors, maps)], dim=1)
        # Anchors stay float32 under autocast: fp16 loses ~1e-3 of a normalised coordinate.
        anchors = self.default_boxes([tuple(m.shape[-2:]) for m in maps], device=maps[0].device)
        return {"cls_logits": cls_logits, "bbox_regression": bbox_regression, "anchors": anchors}

    def loss(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """targets: per image {"boxes": normalised xyxy [N, 4], "labels": int64 [N] in 0..K-1}."""
        return multibox_loss(outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"], targets,
                             self.box_coder, self.iou_threshold, self.neg_pos_ratio,
                             self.min_negatives_per_image)

    def predict(self, outputs: dict[str, Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """Per image {"boxes": xyxy pixels of (h, w), clipped, "scores", "labels" 0..K-1}."""
        return postprocess(outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"],
                           image_sizes, self.box_coder, self.score_threshold, self.topk_candidates,
                           self.nms_iou_threshold, self.detections_per_image, self.nms_pre)
