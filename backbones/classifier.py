"""The ImageNet classifier the papers put on top of a backbone: global pool, dropout, FC."""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone


class ImageClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        backbone.out_features = ("C5",)
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.feature_info["C5"].channels, num_classes)

    def materialized_modules(self) -> list[nn.Module]:
        return [*self.backbone.materialized_modules(), self.pool]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.backbone(images)["C5"]).flatten(1)
        return self.fc(self.dropout(x))
