"""Wiring a backbone and a head into one model, from Hydra configs."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from backbones import Backbone, ImageClassifier
from tasks.resolve import instantiate_node

PREPROCESSING_KEYS = ("mean", "std")  # the weights' input normalisation: read by the dataset transforms


class BackboneWithHead(nn.Module):
    """`forward(images)` runs the backbone then the head; loss and decoding belong to the head."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))

    def loss(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self.head.loss(outputs, targets)

    def predict(self, outputs: Mapping[str, torch.Tensor], image_sizes: Sequence[tuple[int, int]],
                **options) -> list[dict]:
        return self.head.predict(outputs, image_sizes, **options)

    def materialized_modules(self) -> list[nn.Module]:
        return self.backbone.materialized_modules()


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_backbone(backbone_cfg: Mapping, out_features: Sequence[str] | None = None) -> Backbone:
    cfg = {k: v for k, v in _plain(backbone_cfg).items() if k not in PREPROCESSING_KEYS}
    if out_features is not None:
        cfg["out_features"] = list(out_features)
    return instantiate_node(cfg)  # a missing or offline weights file stays one sentence (exit 2)


def build_model(backbone_cfg: Mapping, head_cfg: Mapping | None, num_classes: int) -> nn.Module:
    """Backbone + head, or backbone + the papers' ImageNet classifier when there is no head."""
    if head_cfg is None:
        return ImageClassifier(build_backbone(backbone_cfg, ["C5"]), num_classes=num_classes)
    head_options = {k: v for k, v in _plain(head_cfg).items() if k != "task"}
    in_features = head_options.get("in_features")
    backbone = build_backbone(backbone_cfg, in_features)
    head_factory = hydra.utils.instantiate(head_options, _partial_=True)
    return BackboneWithHead(backbone, head_factory(feature_info=backbone.feature_info, num_classes=num_classes))
