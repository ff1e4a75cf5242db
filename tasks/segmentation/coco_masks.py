"""COCO instance annotations turned into VOC semantic masks (DeepLab's COCO pre-training recipe).

The 20 COCO categories that are VOC classes keep their VOC index; every other category is background.
Crowd regions of VOC categories become 255 (ignore) where no single instance claims the pixel, and
pixels claimed by instances of two different VOC classes become 255 too (torchvision's reference
recipe ignores overlaps the same way).
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tasks.images import load_rgb

from .metrics import ConfusionMatrix
from .palette import IGNORE_INDEX, VOC_CLASSES
from .voc import to_tensor

COCO_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "dining table": "diningtable",
    "dog": "dog", "horse": "horse", "motorcycle": "motorbike", "person": "person",
    "potted plant": "pottedplant", "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor",
}


class CocoVOCSegmentation(Dataset):
    """`(image, {"mask", "image_id", "orig_size"})` over the COCO images that hold a VOC-class object
    (all images with `keep_empty=True`)."""

    num_classes = len(VOC_CLASSES)
    class_names = list(VOC_CLASSES)

    def __init__(self, image_dir: str | Path, ann_file: str | Path,
                 transforms: Callable | None = None, keep_empty: bool = False):
        from pycocotools.coco import COCO

        self.image_dir = Path(image_dir)
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {ann_file} does not exist.")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.image_dir} does not exist.")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.transforms = transforms if transforms is not None else to_tensor
        self.cat_to_label = {}
        for cat in self.coco.loadCats(self.coco.getCatIds()):
            if cat["name"] in COCO_TO_VOC:
                self.cat_to_label[cat["id"]] = VOC_CLASSES.index(COCO_TO_VOC[cat["name"]])
        if not self.cat_to_label:
            raise ValueError(f"COCO annotation file {ann_file} has none of the 20 VOC categories "
                             f"({', '.join(sorted(COCO_TO_VOC))}).")
        ids = sorted(self.coco.getImgIds())
        if not keep_empty:
            ids = [i for i in ids if any(a["category_id"] in self.cat_to_label and not a.get("iscrowd", 0)
                                         for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def build_mask(self, image_id: int) -> np.ndarray:
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        label = np.zeros((height, width), dtype=np.uint8)
        conflict = np.zeros((height, width), dtype=bool)
        crowd = np.zeros((height, width), dtype=bool)
        for ann in self.coco.imgToAnns.get(image_id, []):
            cls = self.cat_to_label.get(ann["category_id"])
            if cls is None:
                continue
            region = self.coco.annToMask(ann).astype(bool)
            if ann.get("iscrowd", 0):
                crowd |= region
                continue
            conflict |= region & (label != 0) & (label != cls)
            label[region] = cls
        label[conflict] = IGNORE_INDEX
        label[crowd & (label == 0)] = IGNORE_INDEX
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_id = self.ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} named in the COCO annotations does not exist.")
        image = load_rgb(path)
        mask = self.build_mask(image_id)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} but its annotations say "
                             f"{mask.shape[1]}x{mask.shape[0]} (WxH).")
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        tensor, mask_t = self.transforms(image, mask)
        target = {"mask": mask_t, "image_id": str(self.ids[index]),
                  "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64)}
        return tensor, target

    def evaluator(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, IGNORE_INDEX, self.class_names)



__all__ = ["CocoVOCSegmentation", "COCO_TO_VOC"]
