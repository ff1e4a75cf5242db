"""A user's own dataset from its files alone: class names and splits read from the data.

The `dataset=voc_det_custom | coco_custom | voc_seg_custom` configs call these through OmegaConf
resolvers (`${mv.voc_det_classes:${dataset.root}}` ..., registered by tasks/resolvers.py), so
`dataset.root=...` is the only override the usual layouts need, and `dataset.class_names=[...]`
replaces what would be read (set once: the splits and `num_classes` interpolate it).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.errors import DataError

LABEL_FILES = ("labels.txt", "classes.txt", "class_names.txt")
# Entries some labelling tools write into their labels file that are not object classes.
NOT_OBJECT_CLASSES = {"__ignore__", "_background_", "__background__", "background"}
CROP_SAMPLE = 200  # photos (spread over the split) whose sizes set the training crop's aspect
MIN_CROP_ASPECT = 0.5  # the crop's short side is at least half its long one (mmseg's Cityscapes crop: 512x1024)


def labels_file(root: Path) -> Path | None:
    return next((root / name for name in LABEL_FILES if (root / name).is_file()), None)


def read_labels_file(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def _root(root: str, what: str) -> Path:
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset.root={root} is not a folder; expected the {what} dataset's folder.")
    return path


def voc_det_class_names(root: str) -> list[str]:
    """`labels.txt` (one name a line; background entries dropped), else the sorted object names of
    Annotations/*.xml."""
    folder = _root(root, "VOC-layout")
    if (path := labels_file(folder)) is not None:
        names = [n for n in read_labels_file(path) if n not in NOT_OBJECT_CLASSES]
        if not names:
            raise DataError(f"{path} lists no object classes; expected one class name a line.")
        return names
    annotations = folder / "Annotations"
    pattern = re.compile(r"<object>.*?<name>\s*([^<]*?)\s*</name>", re.DOTALL)
    found: set[str] = set()
    for xml in annotations.glob("*.xml") if annotations.is_dir() else ():
        found.update(pattern.findall(xml.read_text(errors="replace")))
    if not found:
        raise DataError(f"{folder} has no {', '.join(LABEL_FILES)} and no object names in Annotations/*.xml; "
                        f"expected one of them, or set dataset.class_names=[...].")
    return sorted(found)


def voc_holdout(root: str, train_split: str, val_split: str, part: str) -> str | None:
    """None when ImageSets/Main has either split's list (they are used, and a missing one is reported);
    else `part`: train and val are drawn from Annotations/*.xml by dataset.val_fraction and split_seed."""
    lists = _root(root, "VOC-layout") / "ImageSets" / "Main"
    has_lists = any((lists / f"{split}.txt").is_file() for split in (train_split, val_split))
    return None if has_lists else part


def voc_seg_class_names(root: str) -> list[str]:
    """`labels.txt` (index order, background first), else one name per index the masks use
    ("background", "class_1", ...): the palette PNGs' largest index below 255 sets the count."""
    folder = _root(root, "VOC-layout segmentation")
    if (path := labels_file(folder)) is not None:
        names = [n for n in read_labels_file(path) if n != "__ignore__"]
        if len(names) < 2:
            raise DataError(f"{path} lists {len(names)} classes; expected background and at least one more.")
        return names
    masks = folder / "SegmentationClass"
    largest = -1
    for png in masks.glob("*.png") if masks.is_dir() else ():
        with Image.open(png) as image:
            values = np.unique(np.asarray(image))
        values = values[values != 255]
        if values.size:
            largest = max(largest, int(values.max()))
    if largest < 1:
        raise DataError(f"{folder} has no {', '.join(LABEL_FILES)} and no SegmentationClass/*.png masks with a "
                        f"class above 0; expected one of them, or set dataset.class_names=[...].")
    return ["background"] + [f"class_{i}" for i in range(1, largest + 1)]


def voc_seg_crop_shape(root: str, split: str, crop_size: int) -> list[int]:
    """The training crop [height, width] for the photos of ImageSets/Segmentation/<split>.txt: crop_size on the
    side that is the longer one in most photos, and on the other crop_size times the photos' median short/long
    ratio (at least MIN_CROP_ASPECT, rounded up to a multiple of 16). Their longer side is resized to base_size
    first, so a square crop of 4:3 photos computes a quarter of padding or more at every scale below 4/3.
    Square when the photos are, or when the split cannot be read (the dataset then says what is missing)."""
    folder = Path(str(root)).expanduser()
    listing = folder / "ImageSets" / "Segmentation" / f"{split}.txt"
    names = listing.read_text().split() if listing.is_file() else []
    ratios = []
    for name in names[::max(1, len(names) // CROP_SAMPLE)][:CROP_SAMPLE]:
        try:
            with Image.open(folder / "JPEGImages" / f"{name}.jpg") as image:  # reads the header only
                width, height = image.size
        except OSError:
            continue
        ratios.append(height / width)
    if not ratios:
        return [crop_size, crop_size]
    ratio = float(np.median(ratios))
    aspect = max(MIN_CROP_ASPECT, min(ratio, 1 / ratio))
    short = min(crop_size, math.ceil(crop_size * aspect / 16) * 16)
    return [short, crop_size] if ratio <= 1 else [crop_size, short]


def coco_annotation_file(root: str, split: str) -> str:
    """annotations/<split>.json (or instances_<split>*.json); else the one json in annotations/, which
    the two splits share (split by `coco_holdout`)."""
    folder = _root(root, "COCO-layout") / "annotations"
    candidates = [folder / f"{split}.json", *sorted(folder.glob(f"instances_{split}*.json"))]
    for path in candidates:
        if path.is_file():
            return str(path)
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) == 1:
        return str(jsons[0])
    raise DataError(f"{folder} holds {len(jsons)} json files and no {split}.json; expected train.json and "
                    f"val.json, or one json to split by dataset.val_fraction.")


def coco_holdout(root: str, split: str) -> str | None:
    """None when train and val have their own jsons; else which part (train or val) of the shared one to use."""
    shared = coco_annotation_file(root, "train") == coco_annotation_file(root, "val")
    return split if shared else None


def coco_class_names(ann_file: str) -> list[str]:
    path = Path(str(ann_file))
    try:
        categories = json.loads(path.read_text()).get("categories") or []
        names = [str(c["name"]) for c in sorted(categories, key=lambda c: int(c["id"]))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path} has no readable 'categories' ({type(err).__name__}); expected a COCO "
                        f"instances json.") from None
    if not names:
        raise DataError(f"{path} lists no categories; expected COCO 'categories' entries.")
    return names
