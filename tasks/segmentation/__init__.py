"""Semantic segmentation: VOC (+ SBD trainaug) and COCO->VOC datasets, transforms, mIoU, palette."""
from .coco_masks import CocoVOCSegmentation
from .metrics import ConfusionMatrix, multiscale_flip_logits
from .palette import VOC_CLASSES, VOC_PALETTE, colorize, overlay, save_label_png
from .transforms import build_segmentation_transforms
from .voc import VOCSegmentation

__all__ = ["CocoVOCSegmentation", "ConfusionMatrix", "multiscale_flip_logits", "VOC_CLASSES", "VOC_PALETTE",
           "colorize", "overlay", "save_label_png", "build_segmentation_transforms", "VOCSegmentation"]
