"""What every backbone promises a head: named feature maps and a description of each."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

LEVELS = ("C2", "C3", "C4", "C5")
OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class FeatureInfo:
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: `forward(images) -> {name: map}` for the names in `out_features`.

    Subclasses fill `self.feature_info` with every name they can return (at least C2..C5),
    and `forward_all` with a dict of those names. `feature_info` seen from outside lists only
    the selected outputs, so a head can be built from it directly.
    """

    def __init__(self, out_features: Sequence[str] | None, output_stride: int):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"backbone.output_stride={output_stride} is not supported; "
                             f"expected one of {OUTPUT_STRIDES}.")
        self.output_stride = output_stride
        self._requested = tuple(out_features) if out_features is not None else LEVELS
        self._all_feature_info: dict[str, FeatureInfo] = {}

    def _check_out_features(self) -> None:
        unknown = [n for n in self._requested if n not in self._all_feature_info]
        if unknown:
            raise ValueError(f"backbone.out_features asks for {unknown}, which "
                             f"{type(self).__name__} does not produce; it produces "
                             f"{sorted(self._all_feature_info)}.")

    @property
    def out_features(self) -> tuple[str, ...]:
        return self._requested

    @out_features.setter
    def out_features(self, names: Sequence[str]) -> None:
        self._requested = tuple(names)
        self._check_out_features()

    @property
    def feature_info(self) -> dict[str, FeatureInfo]:
        return {name: self._all_feature_info[name] for name in self._requested}

    @property
    def all_feature_info(self) -> dict[str, FeatureInfo]:
        return dict(self._all_feature_info)

    def materialized_modules(self) -> list[nn.Module]:
        """Modules whose outputs must be held whole in memory (MobileNetV2 paper, Table 3)."""
        raise NotImplementedError

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_all(images)
        return {name: features[name] for name in self._requested}


def tail_dilation_plan(strides: Sequence[int], output_stride: int, initial_stride: int = 1
                       ) -> list[tuple[int, int]]:
    """Turn a list of layer strides into (stride, dilation) pairs that stop at `output_stride`.

    Once the running stride reaches `output_stride`, later strides become 1 and multiply the
    dilation instead; the layer whose stride is removed keeps the previous rate (DeepLab's rule).
    """
    plan, current, rate = [], initial_stride, 1
    for stride in strides:
        if current >= output_stride and stride > 1:
            plan.append((1, rate))
            rate *= stride
        else:
            plan.append((stride, rate))
            current *= stride
    return plan
