"""Real photos as a small own-data segmentation set: coco128 as 480x360 VOC-layout semantic masks.

Shaped like the street-scene sets issue 11 is measured on (480x360, 11 classes): the `num_objects`
categories covering the most pixels (non-crowd annotation areas) become classes 1..K, every other pixel
is background (0, also other categories' objects, as in DeepLab's COCO-to-VOC masks).
- Instances are painted from the largest to the smallest, so where two overlap the smaller one wins
  (a bowl on a dining table, a person on a bed).
- Crowd regions of the chosen categories become 255 (ignore) where no single instance claims the pixel.
- Every photo, landscape or portrait, is centre-cropped to the largest 4:3 landscape window, then resized
  to 480x360: images bilinearly (Pillow, antialiased), masks nearest-neighbour after rasterising the
  polygons/RLE at the photo's own resolution (pycocotools). Portraits thus keep their middle band.
- A seeded split puts `num_val` photos in val, the rest in train.

Writes <out>/JPEGImages/*.jpg, SegmentationClass/*.png (VOC palette PNGs of indices),
ImageSets/Segmentation/{train,val}.txt and labels.txt (background first), which `dataset=voc_seg_custom`
reads with `dataset.root=<out>` alone.
"""
from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.segmentation.palette import IGNORE_INDEX, save_label_png

SIZE = (480, 360)  # width, height


def largest_categories(coco, num: int) -> list[str]:
    """The `num` category names whose non-crowd instances cover the most pixels, largest first."""
    area: dict[int, float] = {}
    for ann in coco.dataset["annotations"]:
        if not ann.get("iscrowd", 0):
            area[ann["category_id"]] = area.get(ann["category_id"], 0.0) + ann["area"]
    ranked = sorted(area, key=lambda cat: (-area[cat], cat))
    return [coco.cats[cat]["name"] for cat in ranked[:num]]


def crop_box(width: int, height: int, aspect: float = SIZE[0] / SIZE[1]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred window of `aspect` (width / height)."""
    if width / height > aspect:
        w, h = round(height * aspect), height
    else:
        w, h = width, round(width / aspect)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def semantic_mask(coco, image_id: int, label_of: dict[int, int]) -> np.ndarray:
    """The photo's class map at its own resolution: larger instances first, crowd -> ignore where unclaimed."""
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    crowd = np.zeros_like(mask, dtype=bool)
    claimed = np.zeros_like(mask, dtype=bool)
    anns = [a for a in coco.imgToAnns.get(image_id, []) if a["category_id"] in label_of]
    for ann in sorted(anns, key=lambda a: -a["area"]):
        region = coco.annToMask(ann).astype(bool)
        if ann.get("iscrowd", 0):
            crowd |= region
            continue
        mask[region] = label_of[ann["category_id"]]
        claimed |= region
    mask[crowd & ~claimed] = IGNORE_INDEX
    return mask


def write_voc_segmentation(coco_root: Path, out: Path, num_objects: int = 10, num_val: int = 28,
                           seed: int = 0) -> dict:
    """All photos of `coco_root`'s instances_train2017.json as described above; returns the class names
    (background first) and the number of photos per split."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_root / "annotations" / "instances_train2017.json"))
    objects = largest_categories(coco, num_objects)
    label_of = {cat: objects.index(c["name"]) + 1 for cat, c in coco.cats.items() if c["name"] in objects}
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    stems = []
    for image_id, info in sorted(coco.imgs.items()):
        stem = Path(info["file_name"]).stem
        box = crop_box(info["width"], info["height"])
        with Image.open(coco_root / "train2017" / info["file_name"]) as photo:
            photo.convert("RGB").crop(box).resize(SIZE, Image.BILINEAR).save(
                out / "JPEGImages" / f"{stem}.jpg", quality=95)
        mask = Image.fromarray(semantic_mask(coco, image_id, label_of)).crop(box).resize(SIZE, Image.NEAREST)
        save_label_png(np.asarray(mask), out / "SegmentationClass" / f"{stem}.png")
        stems.append(stem)
    random.Random(seed).shuffle(stems)
    splits = {"val": sorted(stems[:num_val]), "train": sorted(stems[num_val:])}
    for split, members in splits.items():
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{s}\n" for s in members))
    class_names = ["background", *objects]
    (out / "labels.txt").write_text("".join(f"{name}\n" for name in class_names))
    return {"class_names": class_names, **{split: len(members) for split, members in splits.items()}}
