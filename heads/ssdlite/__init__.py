from .anchors import DefaultBoxes
from .box_coder import BoxCoder
from .head import SSDLiteHead

__all__ = ["BoxCoder", "DefaultBoxes", "SSDLiteHead"]
