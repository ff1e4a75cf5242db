"""PASCAL VOC detection: Annotations/*.xml listed by ImageSets/Main/<image_set>.txt -> (image, target).

A folder without ImageSets lists can be split by a seeded draw over its Annotations/*.xml (`holdout`), and
`other_classes="ignore"` keeps only the objects of `class_names` (a class subset of the user's data)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tasks.detection.coco import DetectionTransformFn, holdout_split, normalise_only
from tasks.detection.voc_eval import VOCEvaluator
from tasks.errors import DataError
from tasks.images import load_rgb

log = logging.getLogger(__name__)
OTHER_CLASSES = ("error", "ignore")

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class VOCRecord:
    """One image's parsed xml. Boxes are 0-based continuous pixels: (xmin - 1, ymin - 1, xmax, ymax)."""

    root: Path
    name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N,4], all objects, difficult included
    labels: np.ndarray  # int64 [N]
    difficult: np.ndarray  # bool [N]


def _text(node: ET.Element | None) -> str | None:
    return None if node is None or node.text is None or not node.text.strip() else node.text.strip()


def parse_voc_xml(xml_path: Path, class_to_label: dict[str, int], root: Path, name: str,
                  left_out: Counter | None = None) -> VOCRecord:
    """Parse one VOC annotation; an empty or missing <difficult> means 0 (the re-annotated VOC2011 files
    leave it empty). Boxes are clipped to the image; a box with no area left is dropped (as COCO's are).
    With `left_out` (a Counter), objects of other classes are counted there instead of refused."""
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation {xml_path} does not exist.")
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"VOC annotation {xml_path} is not valid xml ({err}).") from err
    size = tree.find("size")
    width = _text(size.find("width")) if size is not None else None
    height = _text(size.find("height")) if size is not None else None
    if width is None or height is None:
        image_path = root / "JPEGImages" / f"{name}.jpg"
        if not image_path.is_file():
            raise FileNotFoundError(f"{xml_path} has no <size> and image {image_path} does not exist.")
        try:
            with Image.open(image_path) as im:  # reads the header only
                width, height = im.size
        except (OSError, SyntaxError) as err:
            raise ValueError(f"{xml_path} has no <size> and image {image_path} cannot be read "
                             f"({type(err).__name__}).") from None
    try:
        width, height = int(float(width)), int(float(height))
    except (ValueError, OverflowError):
        raise ValueError(f"{xml_path}: <size> has width {width!r} and height {height!r}; expected whole "
                         f"numbers of pixels.") from None
    boxes, labels, difficult = [], [], []
    for obj in tree.findall("object"):
        cls = _text(obj.find("name"))
        if cls not in class_to_label and left_out is not None:
            left_out[cls] += 1
            continue
        if cls not in class_to_label:
            raise ValueError(f"{xml_path}: object class {cls!r} is not one of {sorted(class_to_label)}.")
        bnd = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(_text(bnd.find(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as err:
            raise ValueError(
                f"{xml_path}: a {cls!r} object lacks numeric bndbox xmin/ymin/xmax/ymax."
            ) from err
        box = (
            min(max(x1 - 1.0, 0.0), width),
            min(max(y1 - 1.0, 0.0), height),
            min(max(x2, 0.0), width),
            min(max(y2, 0.0), height),
        )
        if not (box[2] > box[0] and box[3] > box[1]):
            continue
        diff = _text(obj.find("difficult"))
        try:
            difficult.append(bool(int(float(diff))) if diff is not None else False)
        except (ValueError, OverflowError):
            raise ValueError(f"{xml_path}: a {cls!r} object has <difficult>{diff}</difficult>; "
                             f"expected 0 or 1.") from None
        boxes.append(box)
        labels.append(class_to_label[cls])
    return VOCRecord(
        root=root,
        name=name,
        width=width,
        height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        difficult=np.asarray(difficult, bool),
    )


def voc_image_names(root: Path, image_set: str, holdout: str | None = None, val_fraction: float = 0.2,
                    split_seed: int = 0) -> list[str]:
    """The image names of one split: ImageSets/Main/<image_set>.txt, or with `holdout="train"|"val"` that part
    of a seeded draw over every Annotations/*.xml (val gets round(n * val_fraction) of them)."""
    if holdout is not None:
        stems = sorted(path.stem for path in (root / "Annotations").glob("*.xml"))
        if len(stems) < 2:
            raise DataError(f"{root / 'Annotations'} holds {len(stems)} xml files and there are no ImageSets/Main "
                            f"lists; expected at least 2 annotated images to split into train and val.")
        return holdout_split(stems, holdout, val_fraction, split_seed, root / "Annotations")
    list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC image list {list_file} does not exist (check root and image_set).")
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


class VOCDetection(Dataset):
    """VOC detection over one or more VOC20xx folders (e.g. [VOC2007, VOC2012] with image_set "trainval").

    Targets hold the non-difficult objects only; the difficult ones stay in `records` for the evaluator,
    which ignores detections matched to them as the VOC metric does. `image_id` is the dataset index (VOC
    names are strings and need not be unique across years); `image_names[i]` is the VOC name. `train` is
    recorded for the engine; targets are the same in both modes. `use_07_metric` picks the evaluator's
    11-point AP (VOC2007 test) instead of the all-points one (VOC2010+). `holdout`, `val_fraction` and
    `split_seed` split a folder that has no ImageSets lists (see `voc_image_names`). `other_classes="ignore"`
    leaves out the objects of classes not in `class_names` (counted in one log line) instead of refusing them;
    a named class that then has no object in the split is an error (most likely a misspelt name).
    `iou_range=True`: the evaluator also reports "mAP", the mAP50 averaged over IoU 0.5:0.95 (VOCEvaluator)."""

    def __init__(
        self,
        root: str | Path | Sequence[str | Path],
        image_set: str | Sequence[str] = "train",
        transforms: DetectionTransformFn | None = None,
        train: bool = True,
        class_names: Sequence[str] = VOC_CLASSES,
        use_07_metric: bool = False,
        holdout: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        other_classes: str = "error",
        iou_range: bool = False,
    ):
        roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
        sets = [image_set] * len(roots) if isinstance(image_set, str) else list(image_set)
        if not roots or len(sets) != len(roots):
            raise ValueError(
                f"got {len(roots)} VOC roots and {len(sets)} image sets; expected one set per root."
            )
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        class_to_label = {c: i for i, c in enumerate(self.class_names)}
        if other_classes not in OTHER_CLASSES:
            raise ValueError(f"other_classes={other_classes!r}; expected one of {', '.join(OTHER_CLASSES)}.")
        left_out: Counter | None = Counter() if other_classes == "ignore" else None
        self.records: list[VOCRecord] = []
        for r, s in zip(roots, sets, strict=True):
            for name in voc_image_names(r, s, holdout, val_fraction, split_seed):
                self.records.append(parse_voc_xml(r / "Annotations" / f"{name}.xml", class_to_label, r, name,
                                                  left_out))
        if left_out is not None:
            self._check_subset(left_out, roots, sets if holdout is None else [holdout] * len(roots), bool(train))
        self.image_names = [rec.name for rec in self.records]
        self.image_ids = list(range(len(self.records)))
        self.transforms: DetectionTransformFn = transforms if transforms is not None else normalise_only
        self.train = bool(train)
        self.use_07_metric = bool(use_07_metric)
        self.iou_range = bool(iou_range)

    def __len__(self) -> int:
        return len(self.records)

    def _check_subset(self, left_out: Counter, roots: list[Path], sets: Sequence[str], train: bool) -> None:
        where = ", ".join(f"{r}/{s}" for r, s in zip(roots, sets, strict=True))
        if left_out:
            log.info("%s: %d objects of classes outside class_names were left out (%s)", where,
                     sum(left_out.values()), ", ".join(f"{n} {c}" for c, n in left_out.most_common()))
        counts = Counter(int(label) for rec in self.records for label in rec.labels)
        absent = [c for i, c in enumerate(self.class_names) if counts[i] == 0]
        if absent and self.records:
            found = ", ".join(map(str, sorted(set(left_out) | {self.class_names[i] for i in counts})))
            if train:  # a val split may simply lack a rare class; a training split cannot learn it
                raise DataError(f"{where}: class_names {absent} have no object in this split; expected names as "
                                f"the xml writes them ({found}).")
            log.warning("%s: class_names %s have no object in this split (found: %s)", where, absent, found)

    def get_annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes (difficult excluded) without decoding the image: float32 [N,4] pixels, int64 [N]."""
        rec = self.records[index]
        keep = ~rec.difficult
        return rec.boxes[keep], rec.labels[keep]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        rec = self.records[index]
        path = rec.root / "JPEGImages" / f"{rec.name}.jpg"
        image = load_rgb(path)
        if image.shape[:2] != (rec.height, rec.width):
            raise ValueError(
                f"{path} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{rec.width}x{rec.height}."
            )
        boxes, labels = self.get_annotations(index)
        img, boxes_t, labels_t = self.transforms(image, boxes, labels)
        target = {
            "boxes": boxes_t,
            "labels": labels_t,
            "image_id": index,
            "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64),
        }
        return img, target

    def ground_truth(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """image_id -> (boxes in original pixels, labels, difficult): every object, for the VOC metric."""
        return {i: (rec.boxes, rec.labels, rec.difficult) for i, rec in enumerate(self.records)}

    def evaluator(self) -> VOCEvaluator:
        """VOC mAP@0.5; 11-point AP when built with use_07_metric=True (the VOC2007 test convention)."""
        return VOCEvaluator(self.ground_truth(), self.class_names, iou_threshold=0.5,
                            use_07_metric=self.use_07_metric, iou_range=self.iou_range)
