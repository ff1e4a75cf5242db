"""mobilevision: MobileNetV1/V2 backbones, an SSDLite detection head and a Mobile DeepLabv3 segmentation
head, composed by Hydra configs. This package is the public face; the parts live in backbones/, heads/
and tasks/ (see docs/ARCHITECTURE.md).

    model = mobilevision.build_model("mobilenet_v2", "ssdlite", num_classes=3)   # a fresh composed model
    predictor = mobilevision.load("outputs/train/.../best.ckpt")                   # or an exported model.onnx
    result = predictor.predict("photo.jpg")                                        # .plot(), .to_coco(), ...
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mobilevision")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "build_model", "compose_config", "load", "Predictor", "Result"]


def __getattr__(name: str) -> Any:  # the API pulls in torch and Hydra only when it is used
    if name in ("build_model", "compose_config"):
        from mobilevision import models
        return getattr(models, name)
    if name in ("load", "Predictor", "Result"):
        from mobilevision import predictor
        return getattr(predictor, name)
    raise AttributeError(f"module 'mobilevision' has no attribute {name!r}")
