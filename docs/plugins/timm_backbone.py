"""A plug-in backbone: any timm model as a mobilevision backbone, through timm's `features_only`.

Nothing in the mobilevision package is edited: this module and conf/backbone/timm.yaml sit in the
user's own folder, and the config names the class by its `_target_`. The backbone contract
(docs/ARCHITECTURE.md) is all it honours: `forward(images) -> {name: map}` for the requested names,
and `feature_info` {name: FeatureInfo(channels, stride)} with the semantic levels C2..C5 (the last
map at stride 4, 8, 16, 32), so the SSDLite and DeepLab heads sit on it unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

from backbones.base import LEVELS, Backbone, FeatureInfo


class TimmBackbone(Backbone):
    def __init__(self, model_name: str, out_features: Sequence[str] | None = None, output_stride: int = 32,
                 pretrained: bool = False, **timm_options):
        super().__init__(out_features, output_stride)
        self.body = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                      output_stride=output_stride, **timm_options)
        channels, strides = self.body.feature_info.channels(), self.body.feature_info.reduction()
        # The last map at each of the strides 4, 8, 16, 32 is C2..C5 (with output_stride < 32 the
        # dilated tail keeps the stride, so the deepest maps share it and the last one wins).
        self._index: dict[str, int] = {}
        nominal = [2 ** (i + 1) for i in range(len(strides))]  # the undilated strides 2, 4, 8, ...
        for level, stride in zip(LEVELS, (4, 8, 16, 32)):
            if stride in nominal:
                index = nominal.index(stride)
                self._index[level] = index
                self._all_feature_info[level] = FeatureInfo(channels[index], strides[index])
        self._check_out_features()

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.body(images)
        return {level: maps[index] for level, index in self._index.items()}

    def materialized_modules(self) -> list[nn.Module]:
        return [self.body]
