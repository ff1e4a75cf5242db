"""COCO instances json -> (image, target) pairs for detection training and evaluation."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from tasks.detection.coco_eval import CocoEvaluator
from tasks.detection.transforms import IMAGENET_MEAN, IMAGENET_STD
from tasks.errors import DataError
from tasks.images import load_rgb

DetectionTransformFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


@contextlib.contextmanager
def malformed_entry(ann_file: Path, what: str) -> Iterator[None]:
    """A missing key or a wrong type deep in the json becomes one sentence naming the file and the entry."""
    try:
        yield
    except DataError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError) as err:
        raise DataError(f"{ann_file}: {what} is malformed ({type(err).__name__}: {err}); expected COCO's "
                        f"fields (python -m tasks.check_data names every problem).") from None


def normalise_only(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The transform used when none is given: native size, ImageNet normalisation, boxes divided by (w, h)."""
    h, w = image.shape[:2]
    mean = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
    std = np.asarray(IMAGENET_STD, np.float32) * 255.0
    img = (image.astype(np.float32) - mean) / std
    scale = np.array([w, h, w, h], np.float32)
    return (
        torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
        torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4) / scale),
        torch.from_numpy(np.asarray(labels, np.int64).reshape(-1)),
    )


class CocoDetection(Dataset):
    """COCO detection: contiguous labels 0..K-1 in category-id order, crowd boxes left out of the targets
    (COCOeval handles them from the json), images without boxes kept, xywh -> clipped xyxy, boxes with no
    width or height after clipping dropped. `train` is recorded for the engine; targets are the same in
    both modes because evaluation reads the ground truth from the json itself.

    `class_names` keeps only those categories (by name, in that order; other objects are left out and
    not scored). `holdout="train"|"val"` takes that part of a seeded split of the json's images
    (`val_fraction` of them for val), for a dataset that comes as one json."""

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: DetectionTransformFn | None = None,
        train: bool = True,
        class_names: Sequence[str] | None = None,
        holdout: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.ann_file} does not exist.")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.image_dir} does not exist.")
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.coco = COCO(str(self.ann_file))
            except (AssertionError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{self.ann_file} is not a COCO instances json ({err!r}).") from err
        with malformed_entry(self.ann_file, "'categories' or 'images'"):
            cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
            if not cats:
                raise DataError(f"{self.ann_file} lists no categories; expected COCO 'categories' entries.")
            if class_names is not None:
                cats = _select_categories(cats, class_names, self.ann_file)
            self.label_to_cat_id: list[int] = [int(c["id"]) for c in cats]
            self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_cat_id)}
            self.class_names: list[str] = [str(c["name"]) for c in cats]
            self.image_ids: list[int] = sorted(int(i) for i in self.coco.imgs)
        self.all_categories = class_names is None
        if holdout is not None:
            self.image_ids = holdout_split(self.image_ids, holdout, val_fraction, split_seed, self.ann_file)
        self.num_classes = len(cats)
        self.transforms: DetectionTransformFn = transforms if transforms is not None else normalise_only
        self.train = bool(train)

    def __len__(self) -> int:
        return len(self.image_ids)

    def get_annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes of image `index`, image not decoded: float32 [N,4] xyxy pixels, int64 [N] labels."""
        with malformed_entry(self.ann_file, f"image {self.image_ids[index]} or its annotations"):
            return self._annotations(index)

    def _annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        width, height = float(info["width"]), float(info["height"])
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            bbox = ann.get("bbox")
            if bbox is None or len(bbox) != 4:
                raise DataError(
                    f"{self.ann_file}: annotation {ann.get('id')} has bbox {bbox!r}; expected [x, y, w, h]."
                )
            cat = int(ann["category_id"])
            if cat not in self.cat_id_to_label and not self.all_categories:
                continue  # a category left out by class_names
            if cat not in self.cat_id_to_label:
                raise DataError(
                    f"{self.ann_file}: annotation {ann.get('id')} has category_id {cat}, "
                    "which is not in 'categories'."
                )
            x, y, w, h = (float(v) for v in bbox)
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                labels.append(self.cat_id_to_label[cat])
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.image_ids[index]
        with malformed_entry(self.ann_file, f"image {image_id}"):
            info = self.coco.imgs[image_id]
            path, width, height = self.image_dir / info["file_name"], info["width"], info["height"]
        image = load_rgb(path)
        if image.shape[0] != height or image.shape[1] != width:
            raise ValueError(
                f"{path} is {image.shape[1]}x{image.shape[0]} but {self.ann_file} says {width}x{height}."
            )
        boxes, labels = self.get_annotations(index)
        img, boxes_t, labels_t = self.transforms(image, boxes, labels)
        target = {
            "boxes": boxes_t,
            "labels": labels_t,
            "image_id": int(image_id),
            "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64),
        }
        return img, target

    def evaluator(self) -> CocoEvaluator:
        return CocoEvaluator(self.coco, self.label_to_cat_id)


def _select_categories(cats: list[dict], class_names: Sequence[str], ann_file: Path) -> list[dict]:
    by_name = {str(c["name"]): c for c in cats}
    missing = [n for n in class_names if str(n) not in by_name]
    if missing or not class_names:
        raise DataError(f"dataset.class_names names {missing or 'no classes'}, which {ann_file} does not "
                        f"define; expected names from its categories ({', '.join(sorted(by_name))}).")
    return [by_name[str(n)] for n in class_names]


def holdout_split(image_ids: list, part: str, val_fraction: float, seed: int, ann_file: Path) -> list:
    """A seeded, reproducible train/val split of one json's images, or of a VOC folder's xml names (val gets
    round(n * val_fraction))."""
    if part not in ("train", "val") or not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"{ann_file}: holdout={part!r} with val_fraction={val_fraction}; expected train or val "
                        f"and a fraction strictly between 0 and 1.")
    order = np.random.default_rng(seed).permutation(len(image_ids))
    num_val = min(max(1, round(len(image_ids) * float(val_fraction))), len(image_ids) - 1)
    chosen = order[:num_val] if part == "val" else order[num_val:]
    return sorted(image_ids[i] for i in chosen)
