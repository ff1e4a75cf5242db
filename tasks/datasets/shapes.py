"""The built-in "shapes" datasets, written to disk in the real COCO and PASCAL VOC formats.

Circles, squares and triangles in random solid colours on a noisy colour-gradient background.
Every annotation (COCO polygon/bbox/area, VOC xml box, VOC palette PNG) and the rendered pixels
come from the same rounded polygon, so images and labels agree to the sub-pixel. Objects never
touch each other (masks at least ``_MIN_GAP`` px apart) and lie fully inside the image, so no
annotation ever has to describe a partly hidden or truncated object.

    python -m tasks.datasets.shapes --root data/shapes_det --kind coco --num-train 1000 --num-val 100
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import inspect
import json
import math
import numbers
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPE_CLASSES = ("circle", "square", "triangle")
# Non-contiguous on purpose, like COCO's, so every loader's label <-> category mapping is exercised.
SHAPE_CATEGORY_IDS = (1, 3, 7)
SHAPE_SUPERCATEGORY = "shape"
# VOC segmentation: index = 1 + position in SHAPE_CLASSES, 0 background, 255 ignore.
VOC_IGNORE_INDEX = 255
META_FILE = "shapes_meta.json"
# Bump when the generator's output changes, so ensure_shapes() rewrites datasets made by older code.
FORMAT_VERSION = 1

_SPLIT_CODES = {"train": 0, "val": 1}
_VAL_ID_OFFSET = 1_000_000  # COCO image ids are unique across splits
_SUPERSAMPLE = 4  # antialiasing: shapes are drawn at 4x and box-filtered down
_MIN_REL_SIZE, _MAX_REL_SIZE = 0.15, 0.55  # object extent / shorter image side
_MAX_BOX_IOU = 0.15  # against earlier objects of the same image
_MIN_GAP = 3  # px between two objects' masks, so VOC ignore bands never cover another object
_PLACEMENT_TRIES = 30
_MIN_COLOUR_DISTANCE = 80.0  # RGB distance between an object and the background under it
_NOISE_SIGMA = 4.0
_CIRCLE_VERTICES = 64
_SQUARE_MAX_ROTATION = 15.0  # degrees
_TRIANGLE_MAX_ROTATION = 20.0  # degrees around apex-up
_VOC_BAND_OUT, _VOC_BAND_IN = 2, 1  # ignore band: 2 px outside the boundary + 1 px inside = 3 px
_MIN_IMAGE_SIDE = 32


@dataclass
class _Shape:
    label: int  # 0..K-1 index into SHAPE_CLASSES
    polygon: np.ndarray  # [V, 2] float64 (x, y), rounded to 0.01 px, in pixel-edge coordinates
    mask: np.ndarray  # [H, W] bool, rasterised by pycocotools exactly as COCO's annToMask does


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (768 values), as in the devkit's VOClabelcolormap.m."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """image_size is one side, or (height, width) as any sequence (a Hydra ListConfig too)."""
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        h = w = int(image_size)
    elif isinstance(image_size, Sequence) and len(image_size) == 2:
        h, w = (int(v) for v in image_size)
    else:
        raise ValueError(f"image_size={image_size!r} must be an int or a (height, width) pair.")
    if min(h, w) < _MIN_IMAGE_SIDE:
        raise ValueError(f"image_size={image_size!r} must be at least {_MIN_IMAGE_SIDE} px on each side.")
    return h, w


def _check_counts(num_train: int, num_val: int, empty_fraction: float) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative int.")
    if not 0.0 <= empty_fraction < 1.0:
        raise ValueError(f"empty_fraction={empty_fraction!r} must lie in [0, 1).")


# ---------------------------------------------------------------------------------------- geometry


def _unit_polygon(label: int, rng: np.random.Generator) -> np.ndarray:
    """The shape's outline around the origin, scaled so its larger bbox side is 1."""
    if label == 0:
        t = np.linspace(0.0, 2.0 * np.pi, _CIRCLE_VERTICES, endpoint=False) + rng.uniform(0, 2 * np.pi)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    else:
        if label == 1:
            t = np.deg2rad([45.0, 135.0, 225.0, 315.0])
            angle = rng.uniform(-_SQUARE_MAX_ROTATION, _SQUARE_MAX_ROTATION)
        else:  # apex up: image y grows downwards, so the apex sits at -90 degrees
            t = np.deg2rad([-90.0, 30.0, 150.0])
            angle = rng.uniform(-_TRIANGLE_MAX_ROTATION, _TRIANGLE_MAX_ROTATION)
        t = t + np.deg2rad(angle)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    pts -= (pts.min(0) + pts.max(0)) / 2.0
    return pts / (pts.max(0) - pts.min(0)).max()


def _coverage(polygon: np.ndarray, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixel coverage (uint8, 255 = fully inside) of the polygon over its bbox patch, and the patch origin.

    Used to antialias the image only; the label masks come from _mask().
    Pixel (i, j) covers [j, j+1] x [i, i+1]; PIL's polygon fill puts pixel centres at integers, hence
    the -0.5 shift at the supersampled scale.
    """
    x0 = max(int(math.floor(polygon[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(polygon[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())) + 1, w)
    y1 = min(int(math.ceil(polygon[:, 1].max())) + 1, h)
    s = _SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    pts = (polygon - [x0, y0]) * s - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas.reduce(s)), (y0, x0)


def _mask(polygon: np.ndarray, h: int, w: int) -> np.ndarray:
    """The polygon's pixels as COCO defines them (pycocotools), so VOC PNGs, VOC boxes and COCO agree."""
    rle = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], h, w)
    with warnings.catch_warnings():  # pycocotools' decode warns about numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square (pixels beyond the array count as False)."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        row = grown.copy()
        grown[:, 1:] |= row[:, :-1]
        grown[:, :-1] |= row[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square (pixels beyond the array count as inside)."""
    return ~_dilate(~mask, radius)


def _window(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The mask's bounding rows/columns grown by margin, clipped to the array."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (
        slice(max(ys.min() - margin, 0), min(ys.max() + margin + 1, h)),
        slice(max(xs.min() - margin, 0), min(xs.max() + margin + 1, w)),
    )


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _xyxy(polygon: np.ndarray) -> np.ndarray:
    return np.concatenate([polygon.min(0), polygon.max(0)])


def polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area, which is how COCO's own "area" of a polygon annotation is computed."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# ------------------------------------------------------------------------------------------ scenes


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    phi = rng.uniform(0, 2 * np.pi)
    xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    t = xs[None, :] * math.cos(phi) + ys[:, None] * math.sin(phi)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    return img + rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(_NOISE_SIGMA)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far enough from the background beneath the object (else the farthest candidate).

    Always draws the same number of candidates, so the random stream (and with it every later shape)
    never depends on floating-point pixel values.
    """
    candidates = rng.uniform(0, 255, size=(20, 3))
    distance = np.linalg.norm(candidates - under, axis=1)
    ok = np.flatnonzero(distance >= _MIN_COLOUR_DISTANCE)
    return candidates[ok[0] if len(ok) else int(distance.argmax())]


def _render_scene(rng: np.random.Generator, h: int, w: int, empty: bool) -> tuple[np.ndarray, list[_Shape]]:
    img = _background(rng, h, w)
    shapes: list[_Shape] = []
    occupied = np.zeros((h, w), dtype=bool)
    boxes: list[np.ndarray] = []
    side = min(h, w)
    for _ in range(0 if empty else int(rng.integers(1, 5))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        for _try in range(_PLACEMENT_TRIES):
            size = rng.uniform(_MIN_REL_SIZE, _MAX_REL_SIZE) * side
            poly = _unit_polygon(label, rng) * size
            ext = poly.max(0) - poly.min(0)
            # keep one clear pixel to every image edge: nothing is truncated
            cx = rng.uniform(1 + ext[0] / 2, w - 1 - ext[0] / 2)
            cy = rng.uniform(1 + ext[1] / 2, h - 1 - ext[1] / 2)
            poly = np.round(poly + [cx, cy], 2)
            box = _xyxy(poly)
            if any(_box_iou(box, other) > _MAX_BOX_IOU for other in boxes):
                continue
            mask = _mask(poly, h, w)
            if not mask.any():
                continue
            win = _window(mask, _MIN_GAP)
            if (_dilate(mask[win], _MIN_GAP) & occupied[win]).any():
                continue
            cover, (py, px) = _coverage(poly, h, w)
            region = img[py : py + cover.shape[0], px : px + cover.shape[1]]
            colour = _pick_colour(rng, img[mask].mean(0))
            alpha = cover[..., None].astype(np.float32) / np.float32(255.0)
            region += (colour.astype(np.float32) - region) * alpha
            occupied |= mask
            boxes.append(box)
            shapes.append(_Shape(label, poly, mask))
            break
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), shapes


def _split_scenes(
    seed: int, split: str, n: int, h: int, w: int, empty_fraction: float
) -> Iterator[tuple[int, np.ndarray, list[_Shape]]]:
    """(index, image, shapes) for each image of a split; each image has its own seed-derived generator."""
    code = _SPLIT_CODES[split]
    num_empty = min(math.ceil(empty_fraction * n), max(n - 1, 0))
    chooser = np.random.default_rng([seed, code, 2**31])
    empty = set(chooser.choice(n, size=num_empty, replace=False).tolist()) if num_empty else set()
    for i in range(n):
        rng = np.random.default_rng([seed, code, i])
        img, shapes = _render_scene(rng, h, w, i in empty)
        yield i, img, shapes


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=95)


# -------------------------------------------------------------------------------------------- COCO


def _r2(v: float) -> float:
    return round(float(v), 2)


def write_shapes_coco(
    root: str | Path,
    num_train: int = 1000,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 160,
    seed: int = 0,
    empty_fraction: float = 0.03,
) -> Path:
    """root/{train2017,val2017}/*.jpg and root/annotations/instances_{train,val}2017.json, as COCO."""
    root = Path(root)
    h, w = _image_hw(image_size)
    _check_counts(num_train, num_val, empty_fraction)
    categories = [
        {"id": cid, "name": name, "supercategory": SHAPE_SUPERCATEGORY}
        for cid, name in zip(SHAPE_CATEGORY_IDS, SHAPE_CLASSES, strict=True)
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for split, n in (("train", num_train), ("val", num_val)):
        image_dir = root / f"{split}2017"
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i, img, shapes in _split_scenes(seed, split, n, h, w, empty_fraction):
            image_id = i + 1 + (_VAL_ID_OFFSET if split == "val" else 0)
            file_name = f"{image_id:012d}.jpg"
            _save_jpeg(img, image_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 1})
            for shape in shapes:
                ann_id += 1
                x0, y0, x1, y1 = _xyxy(shape.polygon)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": SHAPE_CATEGORY_IDS[shape.label],
                        "segmentation": [[_r2(v) for v in shape.polygon.reshape(-1)]],
                        "area": _r2(polygon_area(shape.polygon)),
                        "bbox": [_r2(x0), _r2(y0), _r2(x1 - x0), _r2(y1 - y0)],
                        "iscrowd": 0,
                    }
                )
        dataset = {
            "info": {"description": "mobilevision synthetic shapes", "version": str(FORMAT_VERSION)},
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))
    return root


# --------------------------------------------------------------------------------------------- VOC


def _voc_xml(name: str, h: int, w: int, shapes: list[_Shape]) -> str:
    """VOC 2012 annotation; boxes are the 1-based inclusive pixel extent of each object's mask."""
    objects = []
    for shape in shapes:
        ys, xs = np.nonzero(shape.mask)
        objects.append(
            "\t<object>\n"
            f"\t\t<name>{SHAPE_CLASSES[shape.label]}</name>\n"
            "\t\t<pose>Unspecified</pose>\n"
            "\t\t<truncated>0</truncated>\n"
            "\t\t<difficult>0</difficult>\n"
            "\t\t<bndbox>\n"
            f"\t\t\t<xmin>{xs.min() + 1}</xmin>\n"
            f"\t\t\t<ymin>{ys.min() + 1}</ymin>\n"
            f"\t\t\t<xmax>{xs.max() + 1}</xmax>\n"
            f"\t\t\t<ymax>{ys.max() + 1}</ymax>\n"
            "\t\t</bndbox>\n"
            "\t</object>\n"
        )
    return (
        "<annotation>\n"
        "\t<folder>VOC2012</folder>\n"
        f"\t<filename>{escape(name)}.jpg</filename>\n"
        "\t<source>\n\t\t<database>mobilevision synthetic shapes</database>\n"
        "\t\t<annotation>PASCAL VOC2012</annotation>\n\t\t<image>synthetic</image>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segmented>1</segmented>\n" + "".join(objects) + "</annotation>\n"
    )


def _voc_label_map(h: int, w: int, shapes: list[_Shape]) -> np.ndarray:
    """Class indices with a 255 band along every object's boundary, as VOC's annotators drew it."""
    label = np.zeros((h, w), dtype=np.uint8)
    band = np.zeros((h, w), dtype=bool)
    for shape in shapes:
        label[shape.mask] = shape.label + 1
        win = _window(shape.mask, _VOC_BAND_OUT + 1)
        local = shape.mask[win]
        band[win] |= _dilate(local, _VOC_BAND_OUT) & ~_erode(local, _VOC_BAND_IN)
    label[band] = VOC_IGNORE_INDEX
    return label


def write_shapes_voc(
    root: str | Path,
    num_train: int = 1000,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 160,
    seed: int = 0,
    empty_fraction: float = 0.03,
) -> Path:
    """The VOC2012 layout: JPEGImages, SegmentationClass palette PNGs, Annotations xml, ImageSets."""
    root = Path(root)
    h, w = _image_hw(image_size)
    _check_counts(num_train, num_val, empty_fraction)
    dirs = {k: root / k for k in ("JPEGImages", "SegmentationClass", "Annotations")}
    for d in (*dirs.values(), root / "ImageSets" / "Segmentation", root / "ImageSets" / "Main"):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    lists: dict[str, list[str]] = {}
    for split, n in (("train", num_train), ("val", num_val)):
        names = lists[split] = []
        for i, img, shapes in _split_scenes(seed, split, n, h, w, empty_fraction):
            name = f"{split}_{i + 1:06d}"
            names.append(name)
            _save_jpeg(img, dirs["JPEGImages"] / f"{name}.jpg")
            png = Image.fromarray(_voc_label_map(h, w, shapes), mode="P")
            png.putpalette(palette)
            png.save(dirs["SegmentationClass"] / f"{name}.png", format="PNG")
            (dirs["Annotations"] / f"{name}.xml").write_text(_voc_xml(name, h, w, shapes))
    lists["trainval"] = lists["train"] + lists["val"]
    for split, names in lists.items():
        text = "".join(f"{n}\n" for n in names)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(text)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
    return root


# ---------------------------------------------------------------------------------- ensure_shapes

_WRITERS = {"coco": write_shapes_coco, "voc": write_shapes_voc}


def _full_params(kind: str, params: dict) -> dict:
    """The writer's keyword arguments with defaults filled in, in a JSON-comparable form."""
    if kind not in _WRITERS:
        raise ValueError(f"kind={kind!r} must be one of {sorted(_WRITERS)}.")
    sig = inspect.signature(_WRITERS[kind])
    known = [p for p in sig.parameters if p != "root"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown shapes parameter(s) {unknown}; expected some of {known}.")
    full = {p: params.get(p, sig.parameters[p].default) for p in known}
    full["image_size"] = list(_image_hw(full["image_size"]))
    return json.loads(json.dumps(full))


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / META_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialises writers of the same root (e.g. several DDP ranks starting at once)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _same(marker: dict | None, meta: dict) -> bool:
    """The marker records this kind, these parameters and this format (its file list aside)."""
    return marker is not None and {k: v for k, v in marker.items() if k != "files"} == meta


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != META_FILE)


def _replace_listed(root: Path, new: Path, marker: dict) -> None:
    """Swap our old files in `root` for the ones in `new`: only files the old marker lists are removed (and
    folders they leave empty); anything else in root (the user's own files) stays."""
    listed = marker.get("files")
    if not isinstance(listed, list):
        raise ValueError(f"{root} holds a shapes dataset written before {META_FILE} listed its files, so its "
                         f"files cannot be told from yours; refusing to replace it (remove it yourself or "
                         f"choose another root).")
    (root / META_FILE).unlink()  # first: a root without a marker is never mistaken for a complete dataset
    folders = set()
    for name in listed:
        path = (root / name)
        if ".." in Path(name).parts or Path(name).is_absolute():
            continue  # a marker naming files outside root is not ours to follow
        path.unlink(missing_ok=True)
        folders.update(path.parents)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        if folder != root and root in folder.parents:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
    for name in _files_under(new):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / name, root / name)


def ensure_shapes(root: str | Path, kind: str, **params) -> Path:
    """Make sure root holds the shapes dataset of this kind and these parameters; returns root.

    Does nothing when root's marker already records the same kind, parameters and format version.
    Otherwise writes the whole dataset into a sibling temp folder and moves it in, writing the marker
    (which lists every file written) last, so a folder with a marker is always complete. Replacing an
    earlier shapes dataset removes only the files its marker lists; a non-empty root without a marker
    is not ours and is never touched.
    """
    root = Path(root).absolute()
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "params": _full_params(kind, params)}
    if _same(_read_meta(root), meta):
        return root
    with _locked(root):
        marker = _read_meta(root)
        if _same(marker, meta):  # another process wrote it while we waited
            return root
        if root.exists() and marker is None and (not root.is_dir() or any(root.iterdir())):
            raise ValueError(
                f"{root} exists and has no {META_FILE}, so it is not a shapes dataset; "
                "refusing to overwrite it (choose another root or remove it)."
            )
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed writer (ours by name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _WRITERS[kind](tmp, **meta["params"])
            text = json.dumps(meta | {"files": _files_under(tmp)}, indent=2, sort_keys=True) + "\n"
            if marker is not None:
                _replace_listed(root, tmp, marker)
                (root / META_FILE).write_text(text)
            else:
                (tmp / META_FILE).write_text(text)
                if root.exists():
                    root.rmdir()  # empty (checked above)
                os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes dataset in COCO or VOC format.")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--kind", required=True, choices=sorted(_WRITERS))
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, nargs="+", default=[160], help="one side, or height width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--empty-fraction", type=float, default=0.03)
    args = parser.parse_args(argv)
    if len(args.image_size) not in (1, 2):
        parser.error("--image-size takes one side or a height and a width")
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    root = ensure_shapes(
        args.root,
        args.kind,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=size,
        seed=args.seed,
        empty_fraction=args.empty_fraction,
    )
    print(root)


if __name__ == "__main__":
    main()
