"""Detection data (COCO json, VOC xml), box-aware transforms, collate, COCO and VOC metrics."""

from tasks.detection.coco import CocoDetection
from tasks.detection.coco_eval import CocoEvaluator
from tasks.detection.transforms import build_detection_transforms
from tasks.detection.voc import VOC_CLASSES, VOCDetection
from tasks.detection.voc_eval import VOCEvaluator

__all__ = [
    "VOC_CLASSES",
    "CocoDetection",
    "CocoEvaluator",
    "VOCDetection",
    "VOCEvaluator",
    "build_detection_transforms",
]
