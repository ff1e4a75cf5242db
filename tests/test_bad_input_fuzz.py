"""Seeded fuzzing of annotation files: whatever the corruption, checking and loading end in success or in
one clear sentence naming the file (ValueError / FileNotFoundError / DataError), never in a KeyError,
TypeError, IndexError, AttributeError or any other unhandled exception."""
import copy
import json
import math
import random
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.datasets.check import check_dataset
from tasks.datasets.report import DataReport
from tasks.datasets.shapes import SHAPE_CLASSES, write_shapes_coco, write_shapes_voc
from tasks.detection.coco import CocoDetection
from tasks.detection.transforms import build_detection_transforms
from tasks.detection.voc import VOCDetection
from tasks.segmentation.transforms import build_segmentation_transforms
from tasks.segmentation.voc import VOCSegmentation

SIZE = 64
CLEAR_ERRORS = (ValueError, FileNotFoundError)  # DataError, ConfigError and CheckpointError are ValueErrors
JUNK = [None, "abc", "12", "", [], {}, [1, 2], True, -1, 0, 1.5, -7.25, math.nan, math.inf, -math.inf, 1e20, 2**70]


def assert_clear(message: str, roots: tuple[Path, ...]) -> None:
    """One line, one sentence (no '. Capital' inside), naming a file of the dataset."""
    assert "\n" not in message, message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    assert any(str(root) in message for root in roots), f"names no file of {roots}: {message}"


def run_case(root: tuple[Path, ...], cfg: dict, build) -> tuple[DataReport, BaseException | None]:
    """check_dataset (stat only, then decoding), then the loader on every item; returns the decoding check's
    report and the loader's clear error."""
    for decode in (False, True):
        report = check_dataset(cfg, decode_images=decode)
        if not report.ok:
            assert_clear(report.sentence(), root)
        for p in report.fatal + report.warnings:
            assert_clear(p.message, root)
    error = None
    try:
        dataset = build()
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.shape == (3, SIZE, SIZE)
    except CLEAR_ERRORS as err:
        assert_clear(str(err), root)
        error = err
    # what the check passes (with decode=true: a stat cannot see a wrong width), the loader loads
    assert error is None or not report.ok, f"the loader failed ({error}) but the check passed:\n{report.summary()}"
    return report, error


# ------------------------------------------------------------------------------------------- COCO


def corrupt_coco(data: dict, rng: random.Random) -> dict | str:
    op = rng.choice(["delete_key", "junk_value", "bad_number", "string_id", "missing_image", "drop_image",
                     "truncate", "bad_bbox", "drop_section", "duplicate", "top_level"])
    sections = [k for k in ("images", "annotations", "categories") if isinstance(data.get(k), list) and data[k]]
    if op == "truncate":
        text = json.dumps(data)
        return text[: rng.randrange(len(text))]
    if op == "top_level":
        return rng.choice([[], [data], "text", 3, None])
    if op == "drop_section":
        data.pop(rng.choice(["images", "annotations", "categories"]), None)
        return data
    if not sections:
        return data
    section = rng.choice(sections)
    entry = rng.choice(data[section])
    if not isinstance(entry, dict):
        return data
    if op == "delete_key" and entry:
        entry.pop(rng.choice(sorted(entry)))
    elif op == "junk_value" and entry:
        entry[rng.choice(sorted(entry))] = copy.deepcopy(rng.choice(JUNK))
    elif op == "bad_number":
        key = rng.choice([k for k in ("width", "height", "id", "image_id", "category_id", "iscrowd") if k in entry]
                         or ["id"])
        entry[key] = rng.choice([-5, 0, math.nan, -math.inf, 1e30, 3.5])
    elif op == "string_id":
        key = rng.choice([k for k in ("id", "image_id", "category_id", "width") if k in entry] or ["id"])
        entry[key] = str(entry.get(key, 1))
    elif op == "missing_image" and data.get("images"):
        rng.choice(data["images"])["file_name"] = "no_such_image.jpg"
    elif op == "drop_image" and data.get("images"):
        data["images"].pop(rng.randrange(len(data["images"])))
    elif op == "bad_bbox" and data.get("annotations"):
        ann = rng.choice(data["annotations"])
        ann["bbox"] = rng.choice([
            [1, 2, -5, 3], [math.nan, 0, 4, 4], [0, 0, 4], "1,2,3,4", [1, 2, "3", 4], [500, 500, 5, 5],
            [-1.5, -1, 10, 10], [0, 0, 0, 5], [0, 0, 300, 300], [1, 2, None, 4], {"x": 1}])
    elif op == "duplicate" and section != "categories":
        data[section].append(copy.deepcopy(entry))
    return data


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_shapes_coco(tmp_path_factory.mktemp("coco"), num_train=6, num_val=0, image_size=SIZE, seed=3)


def test_fuzzed_coco_json_fails_clearly_or_loads(coco_root, tmp_path):
    pristine = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    transforms = build_detection_transforms(SIZE, train=False)
    rng = random.Random(20240607)
    failures, seen = 0, set()
    for it in range(200):
        data: dict | str = copy.deepcopy(pristine)
        for _ in range(rng.randint(1, 3)):
            if isinstance(data, dict):
                data = corrupt_coco(data, rng)
        ann_file = tmp_path / f"instances_{it}.json"
        ann_file.write_text(data if isinstance(data, str) else json.dumps(data))
        cfg = {"task": "detection", "num_classes": 3,
               "train": {"_target_": "tasks.detection.coco.CocoDetection", "image_dir": str(coco_root / "train2017"),
                         "ann_file": str(ann_file)}}
        report, error = run_case((tmp_path, coco_root), cfg, lambda f=ann_file: CocoDetection(
            coco_root / "train2017", f, transforms=transforms, train=False))
        failures += not report.ok
        seen |= set(report.fatal_counts) | set(report.warning_counts)
    assert failures > 150  # most corruptions are caught; the rest (e.g. a dropped optional key) load
    assert seen >= {"unreadable annotation file", "wrong type", "missing field", "duplicate id", "unknown image id",
                    "unknown category", "missing image", "bad image size", "bad box", "box outside image",
                    "box clipped", "empty box dropped"}


# -------------------------------------------------------------------------------------------- VOC


def corrupt_xml(path: Path, rng: random.Random) -> None:
    op = rng.choice(["delete", "delete", "text", "text", "truncate", "garbage", "unknown_class", "remove_file"])
    if op == "remove_file":
        path.unlink()
        return
    data = path.read_bytes()
    if op == "truncate":
        path.write_bytes(data[: rng.randrange(max(len(data), 1))])
        return
    if op == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(60))))
        return
    try:
        tree = ET.fromstring(data)
    except ET.ParseError:  # already broken by an earlier corruption
        return
    parents = {child: parent for parent in tree.iter() for child in parent}
    nodes = [n for n in tree.iter() if n.tag in ("size", "width", "height", "object", "name", "bndbox", "xmin",
                                                  "ymin", "xmax", "ymax", "difficult")]
    if not nodes:
        return
    node = rng.choice(nodes)
    if op == "delete":
        parents[node].remove(node)
    elif op == "text":
        node.text = rng.choice(["abc", "", "nan", "-5", "1e400", "12.5.3", "0", "9999", " 3 "])
    elif op == "unknown_class":
        for name in tree.iter("name"):
            name.text = "dragon"
            break
    path.write_text(ET.tostring(tree, encoding="unicode"))


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return write_shapes_voc(tmp_path_factory.mktemp("voc"), num_train=5, num_val=0, image_size=SIZE, seed=5)


def test_fuzzed_voc_xml_fails_clearly_or_loads(voc_root, tmp_path):
    root = tmp_path / "VOC"
    shutil.copytree(voc_root, root)
    pristine = {p.name: p.read_bytes() for p in (voc_root / "Annotations").iterdir()}
    transforms = build_detection_transforms(SIZE, train=False)
    cfg = {"task": "detection", "train": {"_target_": "tasks.detection.voc.VOCDetection", "root": str(root),
                                          "image_set": "train", "class_names": list(SHAPE_CLASSES)}}
    rng = random.Random(7)
    failures, seen = 0, set()
    for _ in range(120):
        for name, data in pristine.items():
            (root / "Annotations" / name).write_bytes(data)
        for _ in range(rng.randint(1, 2)):
            xml = root / "Annotations" / rng.choice(sorted(pristine))
            if xml.exists():
                corrupt_xml(xml, rng)
        report, error = run_case((tmp_path,), cfg, lambda: VOCDetection(
            root, "train", transforms=transforms, train=False, class_names=SHAPE_CLASSES))
        failures += not report.ok
        seen |= set(report.fatal_counts) | set(report.warning_counts)
    assert failures > 80
    assert seen >= {"unreadable annotation file", "missing file", "missing field", "missing size", "unknown category",
                    "bad image size", "image size mismatch", "bad box", "box outside image"}


def corrupt_segmentation(root: Path, rng: random.Random) -> None:
    names = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    name = rng.choice(names)
    mask, jpg = root / "SegmentationClass" / f"{name}.png", root / "JPEGImages" / f"{name}.jpg"
    op = rng.choice(["truncate_mask", "mask_size", "mask_id", "rgb_mask", "remove_mask", "truncate_jpg",
                     "garbage_jpg", "remove_jpg", "bogus_list_entry"])
    if not (mask.exists() and jpg.exists()):  # already removed by an earlier corruption
        return
    try:
        with Image.open(mask) as im:
            intact = im.mode == "P" and im.size == (SIZE, SIZE) and im.load() is not None
    except (OSError, SyntaxError, ValueError):
        intact = False
    if not intact and op in ("mask_id", "rgb_mask"):
        return
    if op in ("truncate_mask", "truncate_jpg"):
        path = mask if op == "truncate_mask" else jpg
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data) // 2, len(data) - 16)])
    elif op == "mask_size":
        Image.new("P", (SIZE + rng.choice([-9, 3]), SIZE)).save(mask)
    elif op == "mask_id":
        array = np.array(Image.open(mask))
        array[rng.randrange(SIZE), rng.randrange(SIZE)] = rng.choice([4, 42, 254])
        Image.fromarray(array, mode="L").save(mask)
    elif op == "rgb_mask":
        Image.open(mask).convert("RGB").save(mask)
    elif op == "garbage_jpg":
        jpg.write_bytes(bytes(rng.randrange(256) for _ in range(100)))
    elif op in ("remove_mask", "remove_jpg"):
        (mask if op == "remove_mask" else jpg).unlink()
    else:
        with open(root / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
            f.write("not_an_image\n")


def test_fuzzed_voc_segmentation_fails_clearly_or_loads(voc_root, tmp_path):
    transforms = build_segmentation_transforms(SIZE, train=False)
    names = ["background", *SHAPE_CLASSES]
    rng = random.Random(11)
    failures, seen = 0, set()
    for it in range(40):
        root = tmp_path / f"VOC{it}"
        shutil.copytree(voc_root, root, ignore=shutil.ignore_patterns("Annotations"))
        for _ in range(rng.randint(1, 2)):
            corrupt_segmentation(root, rng)
        cfg = {"task": "segmentation", "num_classes": 4, "train": {
            "_target_": "tasks.segmentation.voc.VOCSegmentation", "root": str(root), "image_set": "train",
            "class_names": names}}
        report, error = run_case((tmp_path,), cfg, lambda r=root: VOCSegmentation(
            r, "train", transforms=transforms, class_names=names))
        failures += not report.ok
        seen |= set(report.fatal_counts) | set(report.warning_counts)
    assert failures == 40
    assert seen == {"bad mask", "mask size mismatch", "missing image", "missing mask", "unknown mask class",
                    "unreadable image"}  # every corruption here makes an image unusable
