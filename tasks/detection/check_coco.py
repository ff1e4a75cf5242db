"""Check a COCO instances json and its image folder, fast enough for train2017 (118k images, 860k boxes):
annotation fields are read into numpy columns and checked together, and the image folder is listed once
(os.scandir) instead of one stat per file."""
from __future__ import annotations

import gc
import itertools
import json
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.datasets.report import (
    Collector,
    SplitSummary,
    describe_error,
    exists,
    fmt,
    listdir,
    open_image,
    pool_map,
    short_list,
)
from tasks.detection.check_boxes import check_boxes

_NUMBER = (int, float)
_MISSING = object()


def _read_json(path: Path, probs: Collector) -> Any:
    if not path.is_file():
        probs.add("missing file", path, f"{path}: annotation file does not exist; expected a COCO instances json.")
        return _MISSING
    collecting = gc.isenabled()
    gc.disable()  # json makes millions of acyclic objects; the cycle collector's passes over them cost ~40%
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        probs.add("unreadable annotation file", path, f"{path}: invalid json at line {err.lineno}, column "
                  f"{err.colno} ({err.msg}); expected a COCO instances json.")
    except (UnicodeDecodeError, RecursionError, OSError) as err:
        probs.add("unreadable annotation file", path, f"{path}: cannot be read as json ({describe_error(err)}); "
                  f"expected a COCO instances json.")
    finally:
        if collecting:
            gc.enable()
    return _MISSING


def _entries(data: dict, key: str, path: Path, probs: Collector, what: str) -> list[dict] | None:
    value = data.get(key, _MISSING)
    if value is _MISSING or not isinstance(value, list):
        found = "is missing" if value is _MISSING else f"is a {type(value).__name__}"
        probs.add("missing field", path, f"{path}: '{key}' {found}; expected a list of {what} objects.")
        return None
    if set(map(type, value)) <= {dict}:
        return value
    bad = [i for i, e in enumerate(value) if type(e) is not dict]
    probs.add_many("wrong type", len(bad), ((path, f"{path}: {key}[{i}] is {value[i]!r:.40}; expected a "
                                                   f"{what} object.") for i in bad))
    return [e for e in value if type(e) is dict] if bad else value


def _field(entries: list[dict], key: str) -> list:
    """entries[i][key] for every i, _MISSING where absent (map/itemgetter: ~30 ns an entry, in C)."""
    try:
        return list(map(operator.itemgetter(key), entries))
    except KeyError:
        return [e.get(key, _MISSING) for e in entries]


def _column(entries: list[dict], key: str, kind: str, path: Path, probs: Collector,
            name: Callable[[int], str], required: bool = True, default: Any = 0) -> tuple[np.ndarray, np.ndarray]:
    """One field of every entry as a numpy array, and which entries hold a valid value.
    kind: "int" (id-like), "number" (finite or not: the caller decides), "str"."""
    col = _field(entries, key)
    types = set(map(type, col))
    allowed = {"int": {int}, "number": {int, float}, "str": {str}}[kind]
    if not required and _MISSING in col:
        col = [default if v is _MISSING else v for v in col]
        types = set(map(type, col))
    if types <= allowed:
        valid = np.ones(len(col), bool)
    else:
        valid = np.fromiter((type(v) in allowed for v in col), bool, len(col))
    if not valid.all():
        col = [v if ok else ("" if kind == "str" else 0) for v, ok in zip(col, valid.tolist())]
    if kind == "str":
        values = np.asarray(col, dtype=object)
    else:
        try:
            values = np.asarray(col, dtype=np.int64 if kind == "int" else np.float64)
        except OverflowError:  # a json integer beyond 64 bits
            small = [type(v) is float or abs(v) < 2**62 for v in col]
            valid &= np.asarray(small, bool)
            values = np.asarray([v if ok else 0 for v, ok in zip(col, small)],
                                np.int64 if kind == "int" else np.float64)
    expected = {"int": "an integer", "number": "a number", "str": "a string"}[kind]
    bad = np.flatnonzero(~valid)
    probs.add_many("wrong type", len(bad), (
        (path, f"{path}: {name(int(i))} has " + (f"no '{key}'" if entries[i].get(key, _MISSING) is _MISSING
                                                  else f"{key}={entries[i][key]!r:.40}") + f"; expected {expected}.")
        for i in bad))
    return values, valid


def _duplicates(ids: np.ndarray, valid: np.ndarray, path: Path, probs: Collector, what: str) -> None:
    uniq, counts = np.unique(ids[valid], return_counts=True)
    dup = uniq[counts > 1]
    probs.add_many("duplicate id", len(dup), ((path, f"{path}: {what} id {int(d)} appears "
                                                     f"{int(counts[uniq == d][0])} times; expected unique ids.")
                                              for d in dup))


def check_coco(name: str, image_dir: Path, ann_file: Path, decode: bool, probs: Collector,
                num_classes: int | None) -> SplitSummary:
    summary = SplitSummary(name, "coco", str(ann_file))
    data = _read_json(ann_file, probs)
    if data is _MISSING:
        return summary
    if not isinstance(data, dict):
        probs.add("wrong type", ann_file, f"{ann_file}: the top level is a {type(data).__name__}; expected a json "
                  f"object with 'images', 'annotations' and 'categories'.")
        return summary
    cats = _entries(data, "categories", ann_file, probs, "category")
    images = _entries(data, "images", ann_file, probs, "image")
    anns = _entries(data, "annotations", ann_file, probs, "annotation")
    if cats is None or images is None or anns is None:
        return summary

    # categories
    cat_ids, cat_ok = _column(cats, "id", "int", ann_file, probs, lambda i: f"categories[{i}]")
    cat_names, name_ok = _column(cats, "name", "str", ann_file, probs, lambda i: f"category {cats[i].get('id')!r}")
    _duplicates(cat_ids, cat_ok, ann_file, probs, "category")
    if not cats:
        probs.add("missing field", ann_file, f"{ann_file}: 'categories' is empty; expected the object classes.")
    if num_classes is not None and cats and len(cats) != num_classes:
        probs.add("class count mismatch", ann_file, f"{ann_file}: lists {len(cats)} categories but "
                  f"dataset.num_classes={num_classes}; expected them to agree.")
    order = np.argsort(cat_ids[cat_ok], kind="stable")
    known_cats = cat_ids[cat_ok][order]
    names = [str(n) if ok else f"id {c}" for n, ok, c in zip(cat_names[cat_ok][order], name_ok[cat_ok][order],
                                                             known_cats)]

    # images
    def image_name(i: int) -> str:
        return f"image {images[i].get('file_name', images[i].get('id'))!r:.60}"
    img_ids, id_ok = _column(images, "id", "int", ann_file, probs, lambda i: f"images[{i}]")
    files, file_ok = _column(images, "file_name", "str", ann_file, probs, image_name)
    widths, w_ok = _column(images, "width", "number", ann_file, probs, image_name)
    heights, h_ok = _column(images, "height", "number", ann_file, probs, image_name)
    _duplicates(img_ids, id_ok, ann_file, probs, "image")
    with np.errstate(invalid="ignore"):
        bad_size = (w_ok & h_ok) & ~((widths > 0) & (heights > 0) & (widths == np.round(widths))
                                     & (heights == np.round(heights)))
    probs.first("bad image size", bad_size, lambda i: (ann_file, f"{ann_file}: {image_name(i)} has width "
                f"{widths[i]:g} and height {heights[i]:g}; expected positive whole numbers of pixels."))
    size_ok = w_ok & h_ok & ~bad_size
    summary.images = len(images)

    escapes = np.fromiter((ok and (Path(f).is_absolute() or ".." in Path(f).parts) for f, ok in zip(files, file_ok)),
                          bool, len(files))
    probs.first("unsafe file name", escapes, lambda i: (ann_file, f"{ann_file}: {image_name(i)} has file_name "
                f"{files[i]!r}, which leaves the image folder; expected a path inside {image_dir}."))
    file_ok = file_ok & ~escapes
    listing = listdir(image_dir)
    if listing is None:
        probs.add("missing image", image_dir, f"{image_dir}: image folder does not exist; expected the folder "
                  f"holding the {len(images)} images of {ann_file.name}.")
    else:
        present = np.fromiter((ok and exists(image_dir, listing, f) for f, ok in zip(files, file_ok)), bool,
                              len(files))
        probs.first("missing image", file_ok & ~present, lambda i: (
            image_dir / files[i], f"{image_dir / files[i]}: image file listed in {ann_file.name} does not exist; "
            f"expected it in {image_dir}."))
        # headers (and JPEG ends, for truncation) always; the pixels only with decode
        todo = np.flatnonzero(file_ok & present)
        results = pool_map(lambda i: open_image(image_dir / files[i], decode), todo.tolist())
        for i, (size, reason) in zip(todo.tolist(), results):
            path = image_dir / files[i]
            if reason is not None:
                probs.add("unreadable image", path, f"{path}: cannot be decoded ({reason}); expected a "
                          f"readable image.")
            elif size_ok[i] and size != (widths[i], heights[i]):
                probs.add("image size mismatch", path, f"{path}: is {size[0]}x{size[1]} but {ann_file.name} "
                          f"says {widths[i]:g}x{heights[i]:g}; expected the size the json records.")

    # annotations
    def ann_name(i: int) -> str:
        return f"annotation {anns[i].get('id')!r:.30}"
    ann_ids, aid_ok = _column(anns, "id", "int", ann_file, probs, lambda i: f"annotations[{i}]")
    ann_img, aimg_ok = _column(anns, "image_id", "int", ann_file, probs, ann_name)
    ann_cat, acat_ok = _column(anns, "category_id", "int", ann_file, probs, ann_name)
    crowd, crowd_ok = _column(anns, "iscrowd", "int", ann_file, probs, ann_name, required=False)
    _duplicates(ann_ids, aid_ok, ann_file, probs, "annotation")
    bad_crowd = crowd_ok & (crowd != 0) & (crowd != 1)
    probs.first("wrong type", bad_crowd, lambda i: (ann_file, f"{ann_file}: {ann_name(i)} has iscrowd="
                                                              f"{crowd[i]}; expected 0 or 1."))
    crowd = crowd_ok & (crowd == 1)

    img_order = np.argsort(img_ids[id_ok], kind="stable")
    sorted_img = img_ids[id_ok][img_order]
    img_index = np.flatnonzero(id_ok)[img_order]  # position in `images` of each sorted id
    pos = np.clip(np.searchsorted(sorted_img, ann_img), 0, max(len(sorted_img) - 1, 0))
    found = aimg_ok & (len(sorted_img) > 0)
    if len(sorted_img):
        found &= sorted_img[pos] == ann_img
    probs.first("unknown image id", aimg_ok & ~found, lambda i: (ann_file, f"{ann_file}: {ann_name(i)} refers to "
                f"image_id {ann_img[i]}, which is not in 'images'; expected the id of a listed image."))
    which = np.where(found, img_index[pos] if len(img_index) else 0, -1)

    def ann_subject(i: int) -> str:
        k = which[i]
        return f"{ann_name(i)}" + (f" of {image_name(k)}" if k >= 0 else "")

    cpos = np.clip(np.searchsorted(known_cats, ann_cat), 0, max(len(known_cats) - 1, 0))
    cat_found = acat_ok & (len(known_cats) > 0)
    if len(known_cats):
        cat_found &= known_cats[cpos] == ann_cat
    probs.first("unknown category", acat_ok & ~cat_found, lambda i: (ann_file, f"{ann_file}: {ann_subject(i)} has "
                f"category_id {ann_cat[i]}, which is not in 'categories'; expected one of "
                f"{short_list(known_cats.tolist())}."))

    bbox_col = _field(anns, "bbox")
    if set(map(type, bbox_col)) <= {list} and set(map(len, bbox_col)) <= {4} and \
            set(map(type, itertools.chain.from_iterable(bbox_col))) <= set(_NUMBER):
        box_ok = np.ones(len(anns), bool)
    else:
        box_ok = np.fromiter((type(b) is list and len(b) == 4 and all(type(v) in _NUMBER for v in b)
                              for b in bbox_col), bool, len(bbox_col))
    probs.first("wrong type", ~box_ok, lambda i: (ann_file, f"{ann_file}: {ann_subject(i)} has " + (
        "no 'bbox'" if bbox_col[i] is _MISSING else f"bbox={bbox_col[i]!r:.60}") + "; expected [x, y, width, height]."))
    rows = bbox_col if box_ok.all() else [b if ok else [0, 0, 0, 0] for b, ok in zip(bbox_col, box_ok.tolist())]
    try:
        xywh = np.fromiter(itertools.chain.from_iterable(rows), np.float64, 4 * len(rows)).reshape(-1, 4)
    except OverflowError:
        xywh = np.asarray([[float(v) if abs(v) < 1e300 else math.inf for v in b] for b in rows], np.float64)
    geo = box_ok & found & (size_ok[np.maximum(which, 0)] if len(images) else False)
    idx = np.flatnonzero(geo)
    boxes = xywh[idx].copy()
    with np.errstate(invalid="ignore", over="ignore"):
        boxes[:, 2:] += boxes[:, :2]
    sizes = np.stack([widths[which[idx]], heights[which[idx]]], 1) if len(idx) else np.zeros((0, 2))
    keep_geo = check_boxes(probs, boxes, sizes, lambda j: (
        ann_file, f"{ann_file}: {ann_subject(int(idx[j]))} bbox {fmt(bbox_col[idx[j]])}"))

    kept = np.zeros(len(anns), bool)
    kept[idx] = keep_geo
    counted = kept & cat_found & ~crowd
    per_class = np.bincount(cpos[counted], minlength=len(known_cats)) if len(known_cats) else np.zeros(0, int)
    summary.per_class = {n: int(c) for n, c in zip(names, per_class)}
    summary.ignored = int((crowd & found).sum())
    with_objects = np.zeros(len(images), bool)
    with_objects[which[counted]] = True
    summary.images_without_objects = int((~with_objects).sum())
    return summary

