"""Detection data on real files: COCO json (coco128) and VOC xml, checked against the raw files read
independently (json module, regex on the xml, PIL), plus the box-aware transforms and collate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.detection import transforms as det_transforms
from tasks.detection.coco import CocoDetection
from tasks.detection.coco_eval import CocoEvaluator
from tasks.detection.transforms import IMAGENET_MEAN, IMAGENET_STD, SSDRandomIoUCrop, build_detection_transforms
from tasks.detection.voc import VOC_CLASSES, VOCDetection
from tasks.detection.voc_eval import VOCEvaluator
from tasks.training.loaders import collate


def denormalise(img: torch.Tensor) -> np.ndarray:
    return (img.numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255.0


# ----------------------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco_paths(shared_data: Path) -> tuple[Path, Path]:
    root = shared_data / "coco128"
    return root / "train2017", root / "annotations" / "instances_train2017.json"


@pytest.fixture(scope="module")
def coco_raw(coco_paths) -> dict:
    return json.loads(coco_paths[1].read_text())


@pytest.fixture(scope="module")
def coco(coco_paths) -> CocoDetection:
    return CocoDetection(*coco_paths, transforms=None, train=True)


def raw_targets(raw: dict, image_id: int) -> tuple[list, list, list]:
    """(non-crowd xyxy boxes, their category ids, crowd xyxy boxes) of one image, from the json itself."""
    boxes, cats, crowd = [], [], []
    for a in raw["annotations"]:
        if a["image_id"] != image_id:
            continue
        x, y, w, h = a["bbox"]
        (crowd if a["iscrowd"] else boxes).append([x, y, x + w, y + h])
        if not a["iscrowd"]:
            cats.append(a["category_id"])
    return boxes, cats, crowd


def test_coco_counts_and_categories(coco, coco_raw):
    assert len(coco) == len(coco_raw["images"]) == 128
    assert coco.num_classes == len(coco_raw["categories"]) == 80
    by_id = sorted(coco_raw["categories"], key=lambda c: c["id"])
    assert coco.label_to_cat_id == [c["id"] for c in by_id]
    assert coco.class_names == [c["name"] for c in by_id]
    for cat in coco_raw["categories"]:  # round trip
        assert coco.label_to_cat_id[coco.cat_id_to_label[cat["id"]]] == cat["id"]
    assert coco.label_to_cat_id[0] == 1 and coco.label_to_cat_id[-1] == 90  # ids 1..90 are not contiguous
    all_labels = np.concatenate([coco.get_annotations(i)[1] for i in range(len(coco))])
    assert len(all_labels) == 939 - 10  # every object except the 10 crowd ones
    assert len(set(all_labels.tolist())) == 71
    assert isinstance(coco.evaluator(), CocoEvaluator)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_coco_items_match_json(coco, coco_raw, coco_paths, position):
    info = sorted(coco_raw["images"], key=lambda i: i["id"])[position]
    index = coco.image_ids.index(info["id"])
    image, target = coco[index]
    raw_boxes, raw_cats, _ = raw_targets(coco_raw, info["id"])
    w, h = info["width"], info["height"]
    expected = np.clip(np.array(raw_boxes, np.float64), 0, [w, h, w, h]) / [w, h, w, h]
    assert target["image_id"] == info["id"]
    assert target["orig_size"].tolist() == [h, w]
    assert image.shape == (3, h, w) and image.dtype == torch.float32
    np.testing.assert_allclose(target["boxes"].numpy(), expected, atol=1e-6)
    assert [coco.label_to_cat_id[i] for i in target["labels"].tolist()] == raw_cats
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    pixels = np.asarray(Image.open(coco_paths[0] / info["file_name"]).convert("RGB"), np.float64)
    np.testing.assert_allclose(denormalise(image), pixels, atol=1e-3)
    boxes_px, labels = coco.get_annotations(index)
    np.testing.assert_allclose(boxes_px, expected * [w, h, w, h], rtol=1e-6, atol=1e-3)
    assert labels.tolist() == target["labels"].tolist()


def test_coco_crowd_boxes_left_out(coco, coco_raw):
    crowd_images = sorted({a["image_id"] for a in coco_raw["annotations"] if a["iscrowd"]})
    assert crowd_images, "coco128 is known to hold crowd objects"
    for image_id in crowd_images:
        raw_boxes, _, crowd = raw_targets(coco_raw, image_id)
        boxes, _ = coco.get_annotations(coco.image_ids.index(image_id))
        assert len(boxes) == len(raw_boxes)
        for c in crowd:
            assert not np.any(np.all(np.isclose(boxes, np.array(c, np.float32), atol=1e-3), axis=1))


def test_coco_empty_images_kept(coco, coco_raw, coco_paths):
    annotated = {a["image_id"] for a in coco_raw["annotations"]}
    empty = sorted(i["id"] for i in coco_raw["images"] if i["id"] not in annotated)
    assert empty == [250, 508]
    train_ds = CocoDetection(*coco_paths, transforms=build_detection_transforms(128, train=True, seed=0))
    for image_id in empty:
        index = coco.image_ids.index(image_id)
        for ds in (coco, train_ds):
            image, target = ds[index]
            assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
            assert target["image_id"] == image_id
        assert image.shape == (3, 128, 128)


def test_coco_bad_paths_raise(coco_paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoDetection(coco_paths[0], tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO instances json"):
        CocoDetection(coco_paths[0], bad)


def test_coco_train_pipeline_and_collate(coco_paths):
    ds = CocoDetection(*coco_paths, transforms=build_detection_transforms(160, train=True, seed=1))
    batch = [ds[i] for i in range(6)]
    images, targets = collate(batch)
    assert images.shape == (6, 3, 160, 160) and images.dtype == torch.float32
    assert len(targets) == 6 and all(isinstance(t, dict) for t in targets)
    for t in targets:
        b = t["boxes"]
        assert b.dtype == torch.float32 and t["labels"].dtype == torch.int64 and len(b) == len(t["labels"])
        assert torch.all((b >= 0) & (b <= 1)) and torch.all(b[:, 2:] > b[:, :2])


# ------------------------------------------------------------------------------------------------ VOC


def raw_voc_objects(xml_path: Path) -> list[tuple[str, list[float], bool]]:
    text = xml_path.read_text()
    objects = []
    for obj in re.findall(r"<object>(.*?)</object>", text, flags=re.S):
        name = re.search(r"<name>\s*(\S+)\s*</name>", obj).group(1)
        coords = [float(re.search(rf"<{k}>([^<]+)</{k}>", obj).group(1)) for k in ("xmin", "ymin", "xmax", "ymax")]
        diff = re.search(r"<difficult>\s*(\d)\s*</difficult>", obj)
        objects.append((name, coords, bool(diff and diff.group(1) == "1")))
    return objects


@pytest.fixture(scope="module")
def voc_root(shared_data: Path) -> Path:
    return shared_data / "voc_samples" / "VOC2012"


def test_voc_sample_matches_xml(voc_root):
    ds = VOCDetection(voc_root, image_set="val", train=False)
    listed = (voc_root / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert ds.image_names == listed == ["2011_000003", "2011_000006", "2011_000025"]
    assert ds.num_classes == 20 and ds.class_names == list(VOC_CLASSES) and "background" not in ds.class_names
    gt = ds.ground_truth()
    for index, name in enumerate(listed):
        objects = raw_voc_objects(voc_root / "Annotations" / f"{name}.xml")
        size = re.search(r"<width>(\d+)</width>", (voc_root / "Annotations" / f"{name}.xml").read_text())
        width = int(size.group(1))
        image, target = ds[index]
        h, w = target["orig_size"].tolist()
        assert w == width and (w, h) == Image.open(voc_root / "JPEGImages" / f"{name}.jpg").size
        # 1-based VOC pixels -> 0-based continuous xyxy: (x1 - 1, y1 - 1, x2, y2)
        expected = np.array([[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2), _ in objects])
        np.testing.assert_allclose(target["boxes"].numpy(), expected / [w, h, w, h], atol=1e-6)
        assert target["labels"].tolist() == [VOC_CLASSES.index(n) for n, _, _ in objects]
        assert target["image_id"] == index
        boxes, labels, difficult = gt[index]
        np.testing.assert_allclose(boxes, expected, atol=1e-4)
        assert difficult.tolist() == [d for _, _, d in objects] == [False] * len(objects)  # empty <difficult/>
        assert image.shape == (3, h, w)
    assert isinstance(ds.evaluator(), VOCEvaluator)


def write_voc(root: Path, objects: list[tuple[str, tuple[int, int, int, int], int]], name: str = "img1") -> Path:
    """A one-image VOC folder with a difficult object, for what the shared sample lacks."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 20, 30)).save(root / "JPEGImages" / f"{name}.jpg")
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    (root / "Annotations" / f"{name}.xml").write_text(
        f"<annotation><size><width>64</width><height>48</height><depth>3</depth></size>{objs}</annotation>"
    )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(f"{name}\n")
    return root


def test_voc_difficult_kept_out_of_targets_but_marked(tmp_path):
    root = write_voc(tmp_path / "VOC2007", [("dog", (1, 1, 20, 30), 0), ("cat", (30, 10, 64, 48), 1)])
    ds = VOCDetection(root, image_set="trainval")
    _, target = ds[0]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog")]
    np.testing.assert_allclose(target["boxes"].numpy(), [[0 / 64, 0 / 48, 20 / 64, 30 / 48]], atol=1e-6)
    boxes, labels, difficult = ds.ground_truth()[0]
    assert labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert difficult.tolist() == [False, True]
    np.testing.assert_allclose(boxes, [[0, 0, 20, 30], [29, 9, 64, 48]])
    # two roots (07+12 style) concatenate; image ids stay unique
    root2 = write_voc(tmp_path / "VOC2012", [("cat", (5, 5, 10, 10), 0)])
    both = VOCDetection([root, root2], image_set="trainval")
    assert len(both) == 2 and [both[i][1]["image_id"] for i in range(2)] == [0, 1]


def test_voc_bad_input_raises(tmp_path, voc_root):
    with pytest.raises(FileNotFoundError, match="train.txt"):
        VOCDetection(voc_root, image_set="train")
    root = write_voc(tmp_path / "VOC", [("unicorn", (1, 1, 5, 5), 0)])
    with pytest.raises(ValueError, match="unicorn"):
        VOCDetection(root, image_set="trainval")


# ----------------------------------------------------------------------------------------- transforms

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float64)


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark grey image with three filled, non-overlapping rectangles in pure red/green/blue, one per third of
    the width; label = colour index."""
    h, w = int(rng.integers(120, 240)), int(rng.integers(150, 240))
    img = np.full((h, w, 3), 40, np.uint8)
    boxes = []
    third = w // 3
    for k, colour in enumerate(COLOURS):
        bw, bh = int(rng.integers(third // 3, third)), int(rng.integers(h // 5, h // 2))
        x1, y1 = k * third + int(rng.integers(0, third - bw + 1)), int(rng.integers(0, h - bh))
        img[y1 : y1 + bh, x1 : x1 + bw] = colour
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    return img, np.array(boxes, np.float32), np.arange(3)


def colour_box(img: np.ndarray, label: int) -> np.ndarray | None:
    """Bounding box (continuous xyxy) of the pixels that are mostly this label's colour."""
    dist = np.abs(img - COLOURS[label]).max(axis=2)
    ys, xs = np.nonzero(dist < 100)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_train_augmentations_keep_boxes_on_their_pixels():
    size = 128
    transform = build_detection_transforms(size, train=True, photometric=False, seed=0)
    rng = np.random.default_rng(0)
    seen_shapes = set()
    checked = 0
    for _ in range(150):
        img, boxes, labels = scene(rng)
        out, out_boxes, out_labels = transform(img, boxes, labels)
        assert out.shape == (3, size, size)
        assert out_boxes.dtype == torch.float32 and out_labels.dtype == torch.int64
        assert len(out_boxes) == len(out_labels) and len(set(out_labels.tolist())) == len(out_labels)
        pixels = denormalise(out)
        for box, label in zip(out_boxes.numpy() * size, out_labels.tolist(), strict=True):
            found = colour_box(pixels, label)
            assert found is not None, f"label {label} kept but its colour is gone"
            big = min(box[2] - box[0], box[3] - box[1]) >= 6  # a few pixels of resize blur matter less here
            assert iou(box, found) > (0.75 if big else 0.3), (box, found)
            checked += 1
        seen_shapes.add(len(out_labels))
    assert checked > 200 and seen_shapes >= {1, 2, 3}  # crops really dropped boxes sometimes


def test_photometric_only_leaves_boxes_alone():
    rng = np.random.default_rng(1)
    img, boxes, labels = scene(rng)
    photo = build_detection_transforms(96, train=True, iou_crop=False, zoom_out=False, hflip=False, seed=3)
    plain = build_detection_transforms(96, train=False)
    ref_img, ref_boxes, ref_labels = plain(img, boxes, labels)
    changed = 0
    for _ in range(10):
        out, out_boxes, out_labels = photo(img, boxes, labels)
        torch.testing.assert_close(out_boxes, ref_boxes)
        assert out_labels.tolist() == ref_labels.tolist()
        changed += int(not torch.allclose(out, ref_img))
    assert changed > 0


def test_eval_transform_boxes_and_cleanup():
    img = np.zeros((100, 200, 3), np.uint8)
    boxes = np.array(
        [[20, 10, 120, 60], [-30, 50, 50, 140], [250, 10, 300, 40], [10, 10, 10, 50]], np.float32
    )  # inside; sticks out (clipped); fully outside (dropped); zero width (dropped)
    out, out_boxes, out_labels = build_detection_transforms(64, train=False)(img, boxes, np.array([3, 4, 5, 6]))
    assert out.shape == (3, 64, 64)
    np.testing.assert_allclose(
        out_boxes.numpy(), [[0.1, 0.1, 0.6, 0.6], [0.0, 0.5, 0.25, 1.0]], atol=1e-6
    )  # normalised coords survive a resize unchanged
    assert out_labels.tolist() == [3, 4]
    mean_pixel = denormalise(out)[0, 0]
    np.testing.assert_allclose(mean_pixel, [0, 0, 0], atol=1e-3)


def test_ssd_iou_crop_respects_its_constraints():
    rng = np.random.default_rng(2)
    h, w = 300, 400
    boxes = np.array([[50, 40, 200, 220], [250, 100, 390, 290], [10, 250, 60, 295]], np.float64)
    for min_iou in (0.1, 0.5, 0.7):
        crop = SSDRandomIoUCrop(min_ious=(min_iou,))
        crop.set_random_seed(int(rng.integers(1 << 30)))
        for _ in range(30):
            params = crop.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": boxes / [w, h, w, h]})
            x1, y1, x2, y2 = params["crop_coords"]
            if (x1, y1, x2, y2) == (0, 0, w, h):
                continue  # nothing found in max_draws * trials: image kept whole
            cw, ch = x2 - x1, y2 - y1
            assert 0.5 <= (cw / ch) <= 2.0 + 0.02 and cw >= 0.3 * w - 1 and ch >= 0.3 * h - 1
            cx, cy = boxes[:, [0, 2]].mean(1), boxes[:, [1, 3]].mean(1)
            inside = (x1 < cx) & (cx < x2) & (y1 < cy) & (cy < y2)
            ious = [iou(b, np.array([x1, y1, x2, y2], float)) for b in boxes[inside]]
            assert ious and max(ious) >= min_iou


def test_ssd_iou_crop_drops_boxes_whose_centre_leaves_the_crop():
    h, w = 300, 400
    boxes = np.array([[50, 40, 200, 220], [250, 100, 390, 290], [10, 250, 60, 295], [180, 20, 260, 90]])
    crop = SSDRandomIoUCrop(min_ious=(0.1, 0.3))
    A = det_transforms.A  # imported through our module, which turns off albumentations' online version check
    pipeline = A.Compose([crop], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]), seed=4)
    dropped = 0
    for _ in range(40):
        out = pipeline(image=np.zeros((h, w, 3), np.uint8), bboxes=boxes, labels=np.arange(4))
        x1, y1, x2, y2 = crop.params["crop_coords"]
        cx, cy = boxes[:, [0, 2]].mean(1), boxes[:, [1, 3]].mean(1)
        inside = np.flatnonzero((x1 < cx) & (cx < x2) & (y1 < cy) & (cy < y2))
        assert np.asarray(out["labels"]).tolist() == inside.tolist()
        expected = np.clip(boxes[inside] - [x1, y1, x1, y1], 0, [x2 - x1, y2 - y1] * 2)
        np.testing.assert_allclose(np.asarray(out["bboxes"]).reshape(-1, 4), expected, atol=1e-3)
        dropped += 4 - len(inside)
    assert dropped > 0


class _Repeat(torch.utils.data.Dataset):
    def __init__(self):
        self.img, self.boxes, self.labels = scene(np.random.default_rng(5))
        self.transform = build_detection_transforms(64, train=True)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.transform(self.img, self.boxes, self.labels)[0]


def test_workers_draw_different_augmentations():
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_Repeat(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    first_of_each_worker = [x for i, x in enumerate(loader) if i < 2]  # sample 0 -> worker 0, 1 -> worker 1
    assert not torch.allclose(first_of_each_worker[0], first_of_each_worker[1])
