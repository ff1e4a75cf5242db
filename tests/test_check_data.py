"""tasks.check_data: one kind of bad input per test, each built from a small broken copy of the shapes data,
and each message must name the culprit; good data (shapes and the real samples) passes."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from tasks.datasets.check import check_dataset
from tasks.datasets.report import DataReport
from tasks.datasets.shapes import SHAPE_CATEGORY_IDS, SHAPE_CLASSES, write_shapes_coco, write_shapes_voc
from tasks.detection.coco import CocoDetection
from tasks.detection.voc import VOCDetection
from tasks.errors import ConfigError, DataError

SIZE = 64
SEG_CLASSES = ["background", *SHAPE_CLASSES]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("shapes")
    return {"coco": write_shapes_coco(base / "coco", num_train=10, num_val=2, image_size=SIZE, seed=1),
            "voc": write_shapes_voc(base / "voc", num_train=10, num_val=2, image_size=SIZE, seed=1)}


@pytest.fixture
def coco(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["coco"], tmp_path / "coco"))


@pytest.fixture
def voc(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["voc"], tmp_path / "voc"))


def coco_cfg(root: Path) -> dict:
    split = {"_target_": "tasks.detection.coco.CocoDetection", "image_dir": "${dataset.root}/train2017",
             "ann_file": "${dataset.root}/annotations/instances_train2017.json"}
    return {"task": "detection", "root": str(root), "num_classes": 3, "train": split}


def voc_det_cfg(root: Path) -> dict:
    return {"task": "detection", "num_classes": 3, "train": {
        "_target_": "tasks.detection.voc.VOCDetection", "root": str(root), "image_set": "train",
        "class_names": list(SHAPE_CLASSES)}}


def voc_seg_cfg(root: Path) -> dict:
    return {"task": "segmentation", "num_classes": 4, "train": {
        "_target_": "tasks.segmentation.voc.VOCSegmentation", "root": str(root), "image_set": "train",
        "class_names": SEG_CLASSES}}


def ann_path(root: Path) -> Path:
    return root / "annotations" / "instances_train2017.json"


def edit_json(root: Path, fn) -> dict:
    data = json.loads(ann_path(root).read_text())
    fn(data)
    ann_path(root).write_text(json.dumps(data))
    return data


def xml_with_objects(root: Path, skip: int = 0) -> Path:
    return [p for p in sorted((root / "Annotations").glob("train_*.xml")) if "<object>" in p.read_text()][skip]


def one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"


def only_fatal(report: DataReport, kind: str) -> str:
    """The report failed for exactly one problem of this kind; returns its message."""
    assert dict(report.fatal_counts) == {kind: 1}, report.summary()
    sentence = report.sentence()
    one_sentence(sentence)
    assert sentence.startswith("dataset check failed: 1 problem that stops training, first: ")
    assert sentence.endswith(report.fatal[0].message)
    with pytest.raises(DataError) as err:
        report.raise_if_fatal()
    assert str(err.value) == sentence
    one_sentence(report.fatal[0].message)
    return report.fatal[0].message


# ----------------------------------------------------------------------------------- good data


def test_good_shapes_pass_and_count_what_independent_readers_count(pristine):
    coco, voc = pristine["coco"], pristine["voc"]
    data = json.loads(ann_path(coco).read_text())
    report = check_dataset(coco_cfg(coco), decode_images=True)
    assert report.ok and not report.warnings, report.summary()
    (split,) = report.splits
    by_cat = Counter(a["category_id"] for a in data["annotations"])
    assert split.per_class == {n: by_cat[c] for n, c in zip(SHAPE_CLASSES, SHAPE_CATEGORY_IDS)}
    assert split.images == 10
    assert split.images_without_objects == 10 - len({a["image_id"] for a in data["annotations"]})

    report = check_dataset(voc_det_cfg(voc), decode_images=True)
    assert report.ok and not report.warnings, report.summary()
    names = Counter(n.text for x in (voc / "Annotations").glob("train_*.xml") for n in ET.parse(x).iter("name"))
    assert report.splits[0].per_class == {c: names[c] for c in SHAPE_CLASSES}

    report = check_dataset(voc_seg_cfg(voc), decode_images=True)
    assert report.ok, report.summary()
    pixels = sum(np.bincount(np.asarray(Image.open(p)).ravel(), minlength=256)
                 for p in (voc / "SegmentationClass").glob("train_*.png"))
    assert report.splits[0].per_class == dict(zip(SEG_CLASSES, pixels[:4].tolist()))
    assert report.splits[0].ignored == pixels[255]
    assert "result: OK" in report.summary()


def test_real_samples_pass(shared_data):
    """coco128 has crowd RLE annotations and 2 images without annotations: both are fine."""
    coco128 = shared_data / "coco128"
    cfg = {"task": "detection", "num_classes": 80, "train": {
        "_target_": "tasks.detection.coco.CocoDetection", "image_dir": str(coco128 / "train2017"),
        "ann_file": str(coco128 / "annotations" / "instances_train2017.json")}}
    report = check_dataset(cfg, decode_images=True)
    assert report.ok, report.summary()
    split = report.splits[0]
    assert (split.images, split.images_without_objects, split.ignored) == (128, 2, 10)
    assert sum(split.per_class.values()) == 929  # 939 objects, 10 of them crowd
    voc = shared_data / "voc_samples" / "VOC2012"
    det = {"task": "detection", "train": {"_target_": "tasks.detection.voc.VOCDetection", "root": str(voc),
                                          "image_set": "val"}}
    seg = {"task": "segmentation", "num_classes": 21, "train": {
        "_target_": "tasks.segmentation.voc.VOCSegmentation", "root": str(voc), "image_set": "val"}}
    for cfg in (det, seg):
        report = check_dataset(cfg, decode_images=True)
        assert report.ok, report.summary()
    assert report.splits[0].images == 17


# ----------------------------------------------------------------------------------- COCO json


def test_truncated_jpeg_is_caught_when_decoding_and_by_the_default_check(coco, monkeypatch):
    image = coco / "train2017" / "000000000003.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    message = only_fatal(check_dataset(coco_cfg(coco), decode_images=True), "unreadable image")
    assert message.startswith(f"{image}: cannot be decoded (") and "truncated" in message
    # The default check finds it without decoding: by the missing end-of-image marker in the last bytes.
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the default check decoded pixels"))
    message = only_fatal(check_dataset(coco_cfg(coco)), "unreadable image")
    assert message == (f"{image}: cannot be decoded (it ends without JPEG's end-of-image marker FF D9, so it is "
                       f"truncated); expected a readable image.")


@pytest.mark.parametrize("file_name", ["../outside.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_a_coco_file_name_that_leaves_the_image_folder_is_refused(coco, file_name):
    ann_file = coco / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = file_name
    ann_file.write_text(json.dumps(data))
    message = only_fatal(check_dataset(coco_cfg(coco)), "unsafe file name")
    assert message == (f"{ann_file}: image {file_name!r} has file_name {file_name!r}, which leaves the image "
                       f"folder; expected a path inside {coco / 'train2017'}.")


def test_image_whose_file_is_missing(coco):
    (coco / "train2017" / "000000000004.jpg").unlink()
    message = only_fatal(check_dataset(coco_cfg(coco)), "missing image")
    assert message.startswith(f"{coco / 'train2017' / '000000000004.jpg'}: image file listed in "
                              "instances_train2017.json does not exist")


def test_box_with_negative_width(coco):
    def negative(data):
        data["annotations"][2]["bbox"][2] = -5.0
    data = edit_json(coco, negative)
    ann = data["annotations"][2]
    message = only_fatal(check_dataset(coco_cfg(coco)), "bad box")
    assert message.startswith(f"{ann_path(coco)}: annotation {ann['id']} of image '{ann['image_id']:012d}.jpg' bbox")
    assert "has width -5 and height" in message and "expected a positive width and height" in message


def test_box_slightly_outside_is_clipped_with_a_warning(coco):
    def outside(data):
        data["annotations"][0]["bbox"] = [-1.5, 10.0, 20.0, 20.0]  # 1.5 px left of the image
        data["annotations"][1]["bbox"] = [50.0, 50.0, 15.0, 14.0]  # 1 px beyond the right edge
    data = edit_json(coco, outside)
    report = check_dataset(coco_cfg(coco))
    assert report.ok and report.warning_counts == {"box clipped": 2}, report.summary()
    assert f"annotation {data['annotations'][0]['id']} " in report.warnings[0].message
    assert "reaches 1.5 px beyond the 64x64 image and is clipped to it." in report.warnings[0].message
    # and the loader does clip it to the image
    dataset = CocoDetection(coco / "train2017", ann_path(coco))
    index = dataset.image_ids.index(data["annotations"][0]["image_id"])
    boxes, _ = dataset.get_annotations(index)
    assert [0.0, 10.0, 18.5, 30.0] in boxes.tolist()


@pytest.mark.parametrize("bbox,text", [
    ([40.0, 40.0, 60.0, 60.0], "reaches 36 px beyond the 64x64 image; expected at most 3 px"),  # xyxy as xywh?
    ([70.0, 5.0, 10.0, 10.0], "lies entirely outside the 64x64 image"),
    ([0.0, 0.0, 200.0, 30.0], "is 200x30, more than twice the 64x64 image"),
    ([float("nan"), 0.0, 10.0, 10.0], "holds a NaN or infinite number"),
])
def test_absurd_boxes_are_refused(coco, bbox, text):
    edit_json(coco, lambda data: data["annotations"][0].update(bbox=bbox))
    report = check_dataset(coco_cfg(coco))
    assert report.num_fatal == 1, report.summary()
    assert text in report.fatal[0].message and str(ann_path(coco)) in report.fatal[0].message
    one_sentence(report.sentence())


def test_unknown_category_id(coco):
    data = edit_json(coco, lambda data: data["annotations"][3].update(category_id=99))
    message = only_fatal(check_dataset(coco_cfg(coco)), "unknown category")
    assert message.startswith(f"{ann_path(coco)}: annotation {data['annotations'][3]['id']} of image ")
    assert "has category_id 99, which is not in 'categories'; expected one of 1, 3, 7." in message


def test_malformed_json_names_the_file_and_the_place(coco):
    text = ann_path(coco).read_text().replace('"width": 64', '"width" 64', 1)
    ann_path(coco).write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    message = only_fatal(check_dataset(coco_cfg(coco)), "unreadable annotation file")
    assert message == (f"{ann_path(coco)}: invalid json at line {expected.value.lineno}, column "
                       f"{expected.value.colno} (Expecting ':' delimiter); expected a COCO instances json.")


def test_wrong_types_and_unknown_image_ids(coco):
    def corrupt(data):
        data["images"][0]["width"] = "64"
        data["annotations"][0]["image_id"] = 12345
        del data["annotations"][1]["bbox"]
    edit_json(coco, corrupt)
    report = check_dataset(coco_cfg(coco))
    assert report.fatal_counts == {"wrong type": 2, "unknown image id": 1}, report.summary()
    text = "\n".join(p.message for p in report.fatal)
    assert "image '000000000001.jpg' has width='64'; expected a number." in text
    assert "refers to image_id 12345, which is not in 'images'" in text
    assert "has no 'bbox'; expected [x, y, width, height]." in text


def test_many_problems_are_counted_and_a_few_shown(coco):
    for path in sorted((coco / "train2017").iterdir())[:8]:
        path.unlink()
    report = check_dataset(coco_cfg(coco), max_examples=3)
    assert report.fatal_counts == {"missing image": 8} and len(report.fatal) == 3
    assert report.sentence().startswith("dataset check failed: 8 problems that stop training, first: ")
    assert report.summary().count("does not exist") == 3


def test_a_20k_box_json_is_checked_column_by_column(tmp_path):
    """Every problem planted among 20,000 boxes is found, and nothing else."""
    rng = np.random.default_rng(0)
    n_img, n_ann = 2000, 20000
    (tmp_path / "img").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 90, 90)).save(buffer, "JPEG")  # the default check reads headers and ends
    for i in range(n_img):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(buffer.getvalue())
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(n_img)]
    xy = rng.uniform(0, 300, (n_ann, 2)).round(2)
    wh = rng.uniform(1, 150, (n_ann, 2)).round(2)
    anns = [{"id": k, "image_id": int(rng.integers(n_img)), "category_id": int(rng.integers(1, 4)),
             "bbox": [*xy[k].tolist(), *wh[k].tolist()], "iscrowd": 0, "area": 1.0} for k in range(n_ann)]
    for k in (5, 500, 19999):
        anns[k]["bbox"][3] = -1.0
    for k in (7, 70):
        anns[k]["category_id"] = 4
    for k in (9, 90, 900, 9000):
        anns[k]["bbox"] = [630.0, 10.0, 15.0, 10.0]  # 5 px beyond a 640 px side: under 2%, clipped
    ann = tmp_path / "big.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    cfg = {"task": "detection", "train": {"_target_": "tasks.detection.coco.CocoDetection",
                                          "image_dir": str(tmp_path / "img"), "ann_file": str(ann)}}
    report = check_dataset(cfg)
    assert report.fatal_counts == {"bad box": 3, "unknown category": 2}, report.summary()
    assert report.warning_counts == {"box clipped": 4}
    found = {int(m) for p in report.fatal for m in re.findall(r"annotation (\d+) of image", p.message)}
    assert found == {5, 500, 19999, 7, 70}
    assert sum(report.splits[0].per_class.values()) == n_ann - 5


# -------------------------------------------------------------------------------------- VOC xml


def test_xml_missing_bndbox_or_size(voc):
    xml = xml_with_objects(voc)
    tree = ET.parse(xml)
    obj = tree.getroot().find("object")
    obj.remove(obj.find("bndbox"))
    tree.getroot().remove(tree.getroot().find("size"))
    tree.write(xml)
    message = only_fatal(check_dataset(voc_det_cfg(voc)), "missing field")
    cls = obj.find("name").text
    assert message == (f"{xml}: object 1 ({cls}) has no <bndbox>; expected <bndbox> with xmin, ymin, xmax "
                       "and ymax.")
    with pytest.raises(ValueError, match=re.escape(str(xml))):  # the loader refuses it too
        VOCDetection(voc, "train", class_names=SHAPE_CLASSES)

    obj.append(ET.fromstring("<bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>abc</ymax></bndbox>"))
    tree.write(xml)
    message = only_fatal(check_dataset(voc_det_cfg(voc)), "missing field")
    assert message == (f"{xml}: object 1 ({cls}) <bndbox> has <ymax>abc</ymax>; expected numeric xmin, ymin, "
                       "xmax and ymax.")

    obj.find("bndbox/ymax").text = "30"
    tree.write(xml)
    report = check_dataset(voc_det_cfg(voc))  # no <size>: the loader reads the image header, so a warning
    assert report.ok and report.warning_counts == {"missing size": 1}, report.summary()
    assert report.warnings[0].message == f"{xml}: has no <size>; the image header's 64x64 is used instead."
    dataset = VOCDetection(voc, "train", class_names=SHAPE_CLASSES)
    assert dataset.records[dataset.image_names.index(xml.stem)].width == SIZE


def test_xml_unknown_class_and_syntax_error(voc):
    xml = xml_with_objects(voc, 1)
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))
    message = only_fatal(check_dataset(voc_det_cfg(voc)), "unknown category")
    assert message.startswith(f"{xml}: object 1 has class 'x") and "expected one of circle, square, triangle" in message
    xml.write_text(xml.read_text().replace("</size>", "</sise>"))
    message = only_fatal(check_dataset(voc_det_cfg(voc)), "unreadable annotation file")
    assert re.fullmatch(re.escape(f"{xml}: not well-formed xml at line ") + r"\d+, column \d+; expected a VOC "
                        r"annotation\.", message)


# ------------------------------------------------------------------------------------ VOC masks


def test_mask_of_the_wrong_size(voc):
    mask = voc / "SegmentationClass" / "train_000004.png"
    Image.open(mask).crop((0, 0, SIZE - 4, SIZE)).save(mask)
    message = only_fatal(check_dataset(voc_seg_cfg(voc)), "mask size mismatch")
    assert message == f"{mask}: is 60x64 but its image train_000004.jpg is 64x64; expected the same size."


def test_mask_with_an_unknown_class_id(voc):
    mask = voc / "SegmentationClass" / "train_000005.png"
    image = Image.open(mask)
    pixels = np.array(image)
    pixels[:2, :3] = 42
    out = Image.fromarray(pixels, mode="P")
    out.putpalette(image.getpalette())
    out.save(mask)
    message = only_fatal(check_dataset(voc_seg_cfg(voc)), "unknown mask class")
    assert message == (f"{mask}: holds class id 42 (6 pixels); expected 0..3 (background, circle, square, "
                       "triangle) or 255 (ignore).")


def test_missing_mask_and_list_file(voc):
    (voc / "SegmentationClass" / "train_000006.png").unlink()
    message = only_fatal(check_dataset(voc_seg_cfg(voc)), "missing mask")
    assert message.startswith(f"{voc / 'SegmentationClass' / 'train_000006.png'}: mask of train_000006.jpg does not")
    (voc / "ImageSets" / "Segmentation" / "train.txt").unlink()
    message = only_fatal(check_dataset(voc_seg_cfg(voc)), "missing file")
    assert str(voc / "ImageSets" / "Segmentation" / "train.txt") in message


# ---------------------------------------------------------------------------- config and CLI


def test_config_that_names_no_data_is_a_config_error():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("check_data", overrides=["dataset=coco"])
    with pytest.raises(ConfigError, match=r"^dataset\.root is not set; expected dataset\.root="):
        check_dataset(cfg.dataset)
    with pytest.raises(ConfigError, match="dataset.task=segmentation but dataset.train._target_="):
        check_dataset({**coco_cfg(Path("/nowhere")), "task": "segmentation"})


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tasks.check_data", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_shapes_then_passes_them(tmp_path):
    root = tmp_path / "shapes"
    result = run_cli(tmp_path, "dataset=shapes_seg", f"dataset.root={root}", "dataset.prepare.num_train=6",
                     "dataset.prepare.num_val=2", "dataset.prepare.image_size=48")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "train: " in result.stdout and "val: " in result.stdout and "result: OK" in result.stdout
    assert (root / "shapes_meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock", "shapes"]  # no outputs/, no log


def test_cli_refuses_bad_data_with_one_line_and_code_2(coco):
    (coco / "train2017" / "000000000002.jpg").unlink()
    edit_json(coco, lambda data: data["annotations"][0].update(category_id=5))
    result = run_cli(coco.parent, "dataset=shapes_det", f"dataset.root={coco}", "~dataset.prepare", "decode=true")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: dataset check failed: 2 problems that stop training, first: "
                                    f"{coco / 'train2017' / '000000000002.jpg'}: image file listed in")
    assert "result: FAILED" in result.stdout and "category_id 5" in result.stdout
