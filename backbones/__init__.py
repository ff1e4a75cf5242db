from .base import Backbone, FeatureInfo
from .classifier import ImageClassifier
from .mobilenet_v1 import MobileNetV1
from .mobilenet_v2 import MobileNetV2

__all__ = ["Backbone", "FeatureInfo", "ImageClassifier", "MobileNetV1", "MobileNetV2"]
