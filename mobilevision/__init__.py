"""mobilevision: MobileNetV1/V2 backbones, an SSDLite detection head and a Mobile DeepLabv3 segmentation
head, composed by Hydra configs. This package is the public face; the parts live in backbones/, heads/
and tasks/ (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mobilevision")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
