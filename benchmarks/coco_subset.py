"""Real photos as a small own-data detection set: coco128's images of a few classes in VOC layout.

Used by benchmarks/finetune.py and by the custom-data tests (the photos are linked, not copied)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from xml.sax.saxutils import escape


def write_voc_subset(coco_root: Path, out: Path, classes: list[str], val_fraction: float = 0.25,
                     seed: int = 0) -> dict[str, int]:
    """The images of a COCO json that hold any of `classes`, written in VOC layout under `out`
    (JPEGImages as links, Annotations/*.xml with those classes only, ImageSets/Main/{train,val}.txt
    from a seeded split); returns the number of images per split. Crowd boxes are left out."""
    data = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, list[tuple[str, list[float]]]] = {}
    for ann in data["annotations"]:
        if names[ann["category_id"]] in classes and not ann.get("iscrowd", 0):
            objects.setdefault(ann["image_id"], []).append((names[ann["category_id"]], ann["bbox"]))
    images = {img["id"]: img for img in data["images"] if img["id"] in objects}
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    stems = []
    for image_id, img in sorted(images.items()):
        stem = Path(img["file_name"]).stem
        link = out / "JPEGImages" / f"{stem}.jpg"
        if not link.exists():
            link.symlink_to(coco_root / "train2017" / img["file_name"])
        boxes = "".join(
            f"<object><name>{escape(name)}</name><difficult>0</difficult><bndbox><xmin>{x + 1:.1f}</xmin>"
            f"<ymin>{y + 1:.1f}</ymin><xmax>{x + w:.1f}</xmax><ymax>{y + h:.1f}</ymax></bndbox></object>"
            for name, (x, y, w, h) in objects[image_id])
        (out / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{img['width']}</width>"
            f"<height>{img['height']}</height><depth>3</depth></size>{boxes}</annotation>")
        stems.append(stem)
    random.Random(seed).shuffle(stems)
    num_val = max(1, round(len(stems) * val_fraction))
    splits = {"val": sorted(stems[:num_val]), "train": sorted(stems[num_val:])}
    for split, members in splits.items():
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in members))
    return {split: len(members) for split, members in splits.items()}
