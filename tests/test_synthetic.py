"""The synthetic shapes datasets, checked with the formats' own readers (pycocotools, PIL, ElementTree)."""

import json
import math
import multiprocessing
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from tasks.datasets.shapes import (
    META_FILE,
    SHAPE_CATEGORY_IDS,
    SHAPE_CLASSES,
    ensure_shapes,
    main,
    write_shapes_coco,
    write_shapes_voc,
)

# pycocotools' decode under numpy 2 warns on every call; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SQUARE = np.ones((3, 3), dtype=bool)  # the band is measured in the 8-neighbour (chessboard) distance
# (height, width): not square, so a swapped width/height anywhere shows up
SIZE = (96, 128)
H, W = SIZE
# The first entries of the PASCAL VOC colour map as the devkit prints them, and its entry 255.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 255: (224, 224, 192)}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_shapes_coco(tmp_path_factory.mktemp("coco"), num_train=40, num_val=12, image_size=SIZE)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return write_shapes_voc(tmp_path_factory.mktemp("voc"), num_train=30, num_val=10, image_size=SIZE)


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)))


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_annotations_agree_with_pycocotools_masks(coco_root: Path, split: str) -> None:
    coco = COCO(str(coco_root / "annotations" / f"instances_{split}2017.json"))
    assert sorted(coco.getCatIds()) == sorted(SHAPE_CATEGORY_IDS) == [1, 3, 7]
    assert [c["name"] for c in coco.loadCats(list(SHAPE_CATEGORY_IDS))] == list(SHAPE_CLASSES)
    assert coco.anns, "no annotations were written"
    for ann in coco.anns.values():
        assert ann["iscrowd"] == 0 and ann["category_id"] in SHAPE_CATEGORY_IDS
        (poly_list,) = ann["segmentation"]
        poly = np.asarray(poly_list, dtype=np.float64).reshape(-1, 2)
        assert len(poly) >= 3
        mask = coco.annToMask(ann).astype(bool)
        # area is the polygon's area, as in COCO; its pixel count differs only along the outline
        perimeter = float(np.linalg.norm(poly - np.roll(poly, 1, axis=0), axis=1).sum())
        assert ann["area"] == pytest.approx(_shoelace(poly), abs=0.01)
        assert abs(mask.sum() - ann["area"]) <= 0.25 * perimeter
        # bbox is the polygon's extent; pixels count when their centre is inside, so the mask may
        # reach 0.5 px beyond it, and fall short of a sharp apex by up to ~2 px (1 px for round/square)
        x, y, w, h = ann["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx([*poly.min(0), *poly.max(0)], abs=0.011)
        ys, xs = np.nonzero(mask)
        mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        box = np.array([x, y, x + w, y + h])
        overshoot = np.r_[box[:2] - mask_box[:2], mask_box[2:] - box[2:]]
        assert overshoot.max() <= 0.5 + 1e-6
        assert (-overshoot).max() <= (2.0 if ann["category_id"] == SHAPE_CATEGORY_IDS[2] else 1.0)
        # not truncated, not tiny, not more than 55% of the shorter side
        assert 0 < x and 0 < y and x + w < W and y + h < H
        assert 0.15 * min(H, W) - 0.02 <= max(w, h) <= 0.55 * min(H, W) + 0.02


def test_coco_images_files_and_empty_images(coco_root: Path) -> None:
    all_image_ids, all_ann_ids = [], []
    for split, n in (("train", 40), ("val", 12)):
        coco = COCO(str(coco_root / "annotations" / f"instances_{split}2017.json"))
        images = coco.dataset["images"]
        assert len(images) == n
        for img in images:
            path = coco_root / f"{split}2017" / img["file_name"]
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (img["width"], img["height"]) == (W, H)
        counts = [len(coco.getAnnIds(imgIds=img["id"])) for img in images]
        assert counts.count(0) == math.ceil(0.03 * n)  # a few background-only images
        assert max(counts) <= 4
        all_image_ids += [img["id"] for img in images]
        all_ann_ids += list(coco.anns)
    assert len(set(all_image_ids)) == len(all_image_ids)  # unique across splits, as in COCO
    assert len(set(all_ann_ids)) == len(all_ann_ids)


def test_coco_objects_do_not_overlap_and_match_the_pixels(coco_root: Path) -> None:
    """Objects are disjoint, and in each image the shape's colour is found exactly where its mask is."""
    coco = COCO(str(coco_root / "annotations" / "instances_train2017.json"))
    checked = 0
    for img in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        if len(masks) > 1:
            assert np.sum(masks, axis=0).max() == 1
        rgb = np.asarray(Image.open(coco_root / "train2017" / img["file_name"]), dtype=np.float64)
        for ann, mask in zip(anns, masks, strict=True):
            inner = ndimage.binary_erosion(mask, iterations=2)
            ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=2)
            ring &= ~ndimage.binary_dilation(np.any(masks, axis=0), iterations=2)
            fg, bg = np.median(rgb[inner], axis=0), np.median(rgb[ring], axis=0)
            x, y, w, h = (int(v) for v in ann["bbox"])
            win = (slice(max(y - 3, 0), y + h + 4), slice(max(x - 3, 0), x + w + 4))
            nearer_fg = np.linalg.norm(rgb[win] - fg, axis=-1) < np.linalg.norm(rgb[win] - bg, axis=-1)
            others = np.any(masks, axis=0) & ~mask
            keep = ~ndimage.binary_dilation(others, iterations=1)[win]
            a, b = nearer_fg & keep, mask[win] & keep
            assert (a & b).sum() / (a | b).sum() > 0.9, f"image {img['id']} ann {ann['id']}"
            checked += 1
    assert checked > 20


def test_voc_segmentation_pngs_xml_and_lists(voc_root: Path) -> None:
    sets = voc_root / "ImageSets"
    lists = {s: (sets / "Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval")}
    assert len(lists["train"]) == 30 and len(lists["val"]) == 10
    assert lists["trainval"] == lists["train"] + lists["val"]
    for s in ("train", "val"):
        assert (sets / "Main" / f"{s}.txt").read_text().split() == lists[s]
    stems = {p.stem for p in (voc_root / "JPEGImages").glob("*.jpg")}
    assert stems == set(lists["trainval"])
    assert {p.stem for p in (voc_root / "SegmentationClass").glob("*.png")} == stems
    assert {p.stem for p in (voc_root / "Annotations").glob("*.xml")} == stems

    objects_seen = 0
    for name in lists["trainval"]:
        with Image.open(voc_root / "SegmentationClass" / f"{name}.png") as png:
            assert png.mode == "P"
            palette = png.getpalette()
            for index, colour in VOC_COLOURS.items():
                assert tuple(palette[3 * index : 3 * index + 3]) == colour
            label = np.asarray(png)
        with Image.open(voc_root / "JPEGImages" / f"{name}.jpg") as jpg:
            assert jpg.size == (W, H)
        assert label.shape == (H, W)
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 255}

        root = ET.parse(voc_root / "Annotations" / f"{name}.xml").getroot()
        assert root.findtext("filename") == f"{name}.jpg"
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (W, H)
        boxes = []
        for obj in root.findall("object"):
            assert obj.findtext("truncated") == "0" and obj.findtext("difficult") == "0"
            cls = SHAPE_CLASSES.index(obj.findtext("name")) + 1
            x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 < x1 <= W and 1 <= y0 < y1 <= H  # VOC: 1-based, inclusive
            boxes.append((cls, x0 - 1, y0 - 1, x1 - 1, y1 - 1))
        # every connected region of class pixels lies inside an xml box of its class, and every box
        # holds class pixels
        for cls in (1, 2, 3):
            regions, n = ndimage.label(label == cls)
            for r in range(1, n + 1):
                ys, xs = np.nonzero(regions == r)
                assert any(
                    c == cls and bx0 <= xs.min() and xs.max() <= bx1 and by0 <= ys.min() and ys.max() <= by1
                    for c, bx0, by0, bx1, by1 in boxes
                ), f"{name}: a class-{cls} region lies outside every {SHAPE_CLASSES[cls - 1]} box"
        for cls, bx0, by0, bx1, by1 in boxes:
            assert (label[by0 : by1 + 1, bx0 : bx1 + 1] == cls).sum() > 0
            objects_seen += 1
        # the ignore band: class pixels never touch background, and the band is ~3 px wide
        objects = np.isin(label, (1, 2, 3))
        around = ndimage.binary_dilation(objects, SQUARE, iterations=3) & ~objects
        assert (label[around] == 255).all(), f"{name}: the 255 band does not surround the objects"
        if boxes:
            beyond = ndimage.binary_dilation(objects, SQUARE, iterations=5)
            beyond &= ~ndimage.binary_dilation(objects, SQUARE, iterations=3)
            assert (label[beyond] == 255).mean() < 0.5, f"{name}: the 255 band is wider than ~3 px"
        else:
            assert (label == 0).all()
    assert objects_seen > 20


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_shapes_coco(tmp_path / "a", num_train=6, num_val=2, image_size=64, seed=3)
    b = write_shapes_coco(tmp_path / "b", num_train=6, num_val=2, image_size=64, seed=3)
    c = write_shapes_coco(tmp_path / "c", num_train=6, num_val=2, image_size=64, seed=4)
    for split in ("train", "val"):
        rel = Path("annotations") / f"instances_{split}2017.json"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / rel).read_bytes() != (c / rel).read_bytes()

    va = write_shapes_voc(tmp_path / "va", num_train=6, num_val=2, image_size=64, seed=3)
    vb = write_shapes_voc(tmp_path / "vb", num_train=6, num_val=2, image_size=64, seed=3)
    for sub in ("SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        files = sorted(p.relative_to(va) for p in (va / sub).iterdir())
        assert files and files == sorted(p.relative_to(vb) for p in (vb / sub).iterdir())
        for rel in files:
            assert (va / rel).read_bytes() == (vb / rel).read_bytes(), rel


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ensure_shapes_is_idempotent_and_rewrites_on_change(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    params = {"num_train": 5, "num_val": 2, "image_size": 64}
    assert ensure_shapes(root, "coco", **params) == root.absolute()
    meta = json.loads((root / META_FILE).read_text())
    assert meta["kind"] == "coco" and meta["params"]["num_train"] == 5 and meta["params"]["seed"] == 0
    before = _mtimes(root)
    # same parameters, defaults spelled out or not, and image_size as a pair: nothing is touched
    ensure_shapes(root, "coco", **params)
    ensure_shapes(root, "coco", num_train=5, num_val=2, image_size=(64, 64), seed=0)
    ensure_shapes(root, "coco", num_train=5, num_val=2, image_size=OmegaConf.create([64, 64]))
    assert _mtimes(root) == before

    ensure_shapes(root, "coco", num_train=5, num_val=3, image_size=64)
    assert json.loads((root / META_FILE).read_text())["params"]["num_val"] == 3
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert len(val["images"]) == 3 and len(list((root / "val2017").glob("*.jpg"))) == 3
    # the other kind replaces the folder wholesale; no temp folders are left beside it
    ensure_shapes(root, "voc", **params)
    assert not (root / "annotations").exists() and (root / "SegmentationClass").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["shapes"]


def _ensure_small(root: str) -> str:
    return str(ensure_shapes(root, "voc", num_train=6, num_val=2, image_size=64))


def test_ensure_shapes_from_several_processes_at_once(tmp_path: Path) -> None:
    """As DDP ranks would: all succeed, one complete dataset results, and no temp folder is left."""
    root = tmp_path / "shared"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_ensure_small, [str(root)] * 3)
    assert results == [str(root.absolute())] * 3
    assert json.loads((root / META_FILE).read_text())["params"]["num_train"] == 6
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["shared"]


def test_ensure_shapes_refuses_bad_input(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="shapes_meta.json"):
        ensure_shapes(foreign, "coco", num_train=2, num_val=1, image_size=64)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="kind"):
        ensure_shapes(tmp_path / "x", "yolo")
    with pytest.raises(ValueError, match="num_trian"):
        ensure_shapes(tmp_path / "x", "coco", num_trian=3)
    with pytest.raises(ValueError, match="image_size"):
        write_shapes_coco(tmp_path / "x", num_train=1, num_val=1, image_size=8)


def test_cli_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "det"
    main(
        [
            "--root",
            str(root),
            "--kind",
            "voc",
            "--num-train",
            "3",
            "--num-val",
            "1",
            "--image-size",
            "48",
            "64",
        ]
    )
    assert capsys.readouterr().out.strip() == str(root.absolute())
    meta = json.loads((root / META_FILE).read_text())
    assert meta["params"]["image_size"] == [48, 64]
    with Image.open(next((root / "JPEGImages").glob("*.jpg"))) as im:
        assert im.size == (64, 48)
    assert os.path.isfile(root / "ImageSets" / "Segmentation" / "trainval.txt")
