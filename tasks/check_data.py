"""Check a dataset before training on it: every file parses, every image exists, ids and boxes make sense.

    python -m tasks.check_data dataset=coco dataset.root=/data/coco [decode=true]

Exit code 0 with a summary when the data can be trained on, 2 with one sentence when it cannot.
`check_dataset(cfg.dataset)` is the library entry point (training start-up calls it): it returns a
`DataReport` whose `.fatal` problems stop training and whose `.warnings` (boxes clipped to the image,
empty boxes dropped, a VOC xml without <size>) do not.

Fast on COCO's train2017 (118k images, 860k boxes): annotation fields are read into numpy columns and
checked together, and each image folder is listed once (os.scandir) instead of one stat per file.
"""
from __future__ import annotations

import gc
import itertools
import json
import math
import operator
import os
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException
from PIL import Image

from tasks.cli import run
from tasks.detection.voc import VOC_CLASSES as VOC_DET_CLASSES
from tasks.errors import USER_ERRORS, ConfigError, DataError, user_errors_exit
from tasks.segmentation.palette import VOC_CLASSES as VOC_SEG_CLASSES
from tasks.segmentation.voc import VOCSegmentation, read_sbd_mat

# A box may reach this far beyond the image and still be clipped (a warning); farther is refused.
CLIP_TOLERANCE_PX = 3.0
CLIP_TOLERANCE_FRACTION = 0.02
_NUMBER = (int, float)
_MISSING = object()

LAYOUTS = {  # dataset _target_ -> (task, layout)
    "tasks.detection.coco.CocoDetection": ("detection", "coco"),
    "tasks.detection.voc.VOCDetection": ("detection", "voc_det"),
    "tasks.segmentation.voc.VOCSegmentation": ("segmentation", "voc_seg"),
    "tasks.segmentation.coco_masks.CocoVOCSegmentation": ("segmentation", "coco"),
}
LAYOUT_NAMES = {"coco": "COCO json", "voc_det": "VOC xml", "voc_seg": "VOC segmentation PNGs"}


@dataclass(frozen=True)
class Problem:
    kind: str
    file: str  # the file to fix
    message: str  # one sentence: "<file>: <what>; expected <what>."


@dataclass
class SplitSummary:
    name: str  # "train", "val", or "train+val" when both read the same files
    layout: str
    source: str
    images: int = 0
    images_without_objects: int = 0
    unit: str = "boxes"  # or "pixels"
    per_class: dict[str, int] = field(default_factory=dict)
    ignored: int = 0  # crowd (COCO) or difficult (VOC) boxes, counted apart from per_class
    ignored_name: str = "crowd"


@dataclass
class DataReport:
    task: str
    layout: str
    splits: list[SplitSummary] = field(default_factory=list)
    fatal: list[Problem] = field(default_factory=list)  # the first `max_examples` of each kind
    warnings: list[Problem] = field(default_factory=list)
    fatal_counts: Counter = field(default_factory=Counter)  # kind -> how many in all
    warning_counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.fatal_counts

    @property
    def num_fatal(self) -> int:
        return sum(self.fatal_counts.values())

    @property
    def num_warnings(self) -> int:
        return sum(self.warning_counts.values())

    def sentence(self) -> str | None:
        """The one sentence that stops training, or None when nothing does."""
        if self.ok:
            return None
        n = self.num_fatal
        return (f"dataset check failed: {n} problem{'s' if n != 1 else ''} that stop{'' if n != 1 else 's'} "
                f"training, first: {self.fatal[0].message}")

    def raise_if_fatal(self) -> None:
        if not self.ok:
            raise DataError(self.sentence())

    def summary(self) -> str:
        lines = [f"dataset check ({self.task}, {LAYOUT_NAMES.get(self.layout, self.layout)}) "
                 f"took {self.seconds:.1f} s"]
        for s in self.splits:
            total = sum(s.per_class.values())
            extra = f", {s.ignored} {s.ignored_name}" if s.ignored else ""
            lines.append(f"{s.name}: {s.source}: {s.images} images ({s.images_without_objects} without objects), "
                         f"{total} {'masked ' if s.unit == 'pixels' else ''}{s.unit}{extra}")
            if s.per_class:
                text = ", ".join(f"{k} {v}" for k, v in s.per_class.items())
                lines += textwrap.wrap(text, 110, initial_indent="  ", subsequent_indent="  ")
        for title, counts, examples in (("problems that stop training", self.fatal_counts, self.fatal),
                                        ("warnings", self.warning_counts, self.warnings)):
            lines.append(f"{title}: {sum(counts.values())}")
            for kind, count in counts.items():
                lines.append(f"  {kind}: {count}")
                lines += [f"    {p.message}" for p in examples if p.kind == kind]
        lines.append("result: " + ("OK" if self.ok else f"FAILED ({self.num_fatal} problems that stop training)"))
        return "\n".join(lines)


class _Collector:
    """Counts every problem, keeps the first `max_examples` messages of each kind."""

    def __init__(self, report: DataReport, max_examples: int):
        self.report, self.max_examples = report, max(int(max_examples), 1)

    def add(self, kind: str, file: Path | str, message: str, fatal: bool = True) -> None:
        self.add_many(kind, 1, [(file, message)], fatal)

    def add_many(self, kind: str, count: int, examples: Iterable[tuple[Path | str, str]], fatal: bool = True) -> None:
        """`examples` is lazy: only the first few messages are ever formatted."""
        if count <= 0:
            return
        counts, kept = ((self.report.fatal_counts, self.report.fatal) if fatal
                        else (self.report.warning_counts, self.report.warnings))
        room = self.max_examples - sum(1 for p in kept if p.kind == kind)
        counts[kind] += count
        for file, message in itertools.islice(examples, max(room, 0)):
            kept.append(Problem(kind, str(file), message))

    def first(self, kind: str, bad: np.ndarray, describe: Callable[[int], tuple[Path | str, str]],
              fatal: bool = True) -> None:
        """Record every True of `bad`, formatting messages for the first few only."""
        idx = np.flatnonzero(bad)
        self.add_many(kind, len(idx), (describe(int(i)) for i in idx), fatal)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()).rstrip(".") or "no detail"
    return f"{type(err).__name__}: {text}"


def _listdir(folder: Path) -> set[str] | None:
    """Names in a folder, listed once; None when it is not a folder."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except (FileNotFoundError, NotADirectoryError):
        return None


def _exists(folder: Path, listing: set[str] | None, name: str) -> bool:
    if "/" in name or os.sep in name:  # a file in a subfolder: not in the listing
        return (folder / name).is_file()
    return listing is not None and name in listing


def _open_image(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the header, or from the decoded pixels when `decode`; else the reason."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            return im.size, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, _reason(err)


def _pool_map(fn: Callable, items: Sequence) -> list:
    if len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        return list(pool.map(fn, items, chunksize=64))


def _fmt(values: Iterable) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in values) + "]"


# --------------------------------------------------------------------------------------- boxes


def _check_boxes(probs: _Collector, boxes: np.ndarray, sizes: np.ndarray,
                 describe: Callable[[int], tuple[Path | str, str]]) -> np.ndarray:
    """boxes: float64 [N,4] xyxy in 0-based continuous pixels; sizes: [N,2] (width, height) of each box's
    image; describe(i) -> (file, "subject of the sentence"). Returns which boxes the loader keeps."""
    x1, y1, x2, y2 = boxes.T
    W, H = sizes.T
    with np.errstate(invalid="ignore", over="ignore"):
        w, h = x2 - x1, y2 - y1
        finite = np.isfinite(boxes).all(1) & np.isfinite(w) & np.isfinite(h)
        negative = finite & ((w < 0) | (h < 0))
        empty = finite & ~negative & ((w == 0) | (h == 0))
        sane = finite & ~negative & ~empty
        outside = sane & ((x1 >= W) | (y1 >= H) | (x2 <= 0) | (y2 <= 0))
        huge = sane & ~outside & ((w > 2 * W) | (h > 2 * H))
        over_x = np.maximum(np.maximum(-x1, x2 - W), 0.0)
        over_y = np.maximum(np.maximum(-y1, y2 - H), 0.0)
        tol_x = np.maximum(CLIP_TOLERANCE_PX, CLIP_TOLERANCE_FRACTION * W)
        tol_y = np.maximum(CLIP_TOLERANCE_PX, CLIP_TOLERANCE_FRACTION * H)
        inside = sane & ~outside & ~huge
        far = inside & ((over_x > tol_x) | (over_y > tol_y))
        clipped = inside & ~far & ((over_x > 0) | (over_y > 0))

    def with_text(text: Callable[[int], str]) -> Callable[[int], tuple[Path | str, str]]:
        def fn(i: int) -> tuple[Path | str, str]:
            file, subject = describe(i)
            return file, f"{subject} {text(i)}"
        return fn

    def img(i: int) -> str:
        return f"{W[i]:g}x{H[i]:g} image"

    probs.first("bad box", ~finite, with_text(
        lambda i: "holds a NaN or infinite number; expected finite pixel coordinates."))
    probs.first("bad box", negative, with_text(
        lambda i: f"has width {w[i]:g} and height {h[i]:g}; expected a positive width and height."))
    probs.first("box outside image", outside, with_text(
        lambda i: f"lies entirely outside the {img(i)}; expected a box inside the image."))
    probs.first("box outside image", huge, with_text(
        lambda i: f"is {w[i]:g}x{h[i]:g}, more than twice the {img(i)}; expected a box inside the image."))
    probs.first("box outside image", far, with_text(
        lambda i: f"reaches {max(over_x[i], over_y[i]):g} px beyond the {img(i)}; expected at most "
                  f"{tol_x[i] if over_x[i] > tol_x[i] else tol_y[i]:g} px outside ({CLIP_TOLERANCE_FRACTION:.0%} "
                  f"of the side, at least {CLIP_TOLERANCE_PX:g} px), which would be clipped."))
    probs.first("box clipped", clipped, with_text(
        lambda i: f"reaches {max(over_x[i], over_y[i]):g} px beyond the {img(i)} and is clipped to it."),
        fatal=False)
    probs.first("empty box dropped", empty, with_text(
        lambda i: f"has width {w[i]:g} and height {h[i]:g}, so it is dropped; expected a positive size."),
        fatal=False)
    return sane & ~outside & ~huge & ~far


# ----------------------------------------------------------------------------------------- COCO


def _read_json(path: Path, probs: _Collector) -> Any:
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
        probs.add("unreadable annotation file", path, f"{path}: cannot be read as json ({_reason(err)}); "
                  f"expected a COCO instances json.")
    finally:
        if collecting:
            gc.enable()
    return _MISSING


def _entries(data: dict, key: str, path: Path, probs: _Collector, what: str) -> list[dict] | None:
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


def _column(entries: list[dict], key: str, kind: str, path: Path, probs: _Collector,
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


def _duplicates(ids: np.ndarray, valid: np.ndarray, path: Path, probs: _Collector, what: str) -> None:
    uniq, counts = np.unique(ids[valid], return_counts=True)
    dup = uniq[counts > 1]
    probs.add_many("duplicate id", len(dup), ((path, f"{path}: {what} id {int(d)} appears "
                                                     f"{int(counts[uniq == d][0])} times; expected unique ids.")
                                              for d in dup))


def _check_coco(name: str, image_dir: Path, ann_file: Path, decode: bool, probs: _Collector,
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

    listing = _listdir(image_dir)
    if listing is None:
        probs.add("missing image", image_dir, f"{image_dir}: image folder does not exist; expected the folder "
                  f"holding the {len(images)} images of {ann_file.name}.")
    else:
        present = np.fromiter((ok and _exists(image_dir, listing, f) for f, ok in zip(files, file_ok)), bool,
                              len(files))
        probs.first("missing image", file_ok & ~present, lambda i: (
            image_dir / files[i], f"{image_dir / files[i]}: image file listed in {ann_file.name} does not exist; "
            f"expected it in {image_dir}."))
        if decode:
            todo = np.flatnonzero(file_ok & present)
            results = _pool_map(lambda i: _open_image(image_dir / files[i], True), todo.tolist())
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
                f"{_short_list(known_cats.tolist())}."))

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
    keep_geo = _check_boxes(probs, boxes, sizes, lambda j: (
        ann_file, f"{ann_file}: {ann_subject(int(idx[j]))} bbox {_fmt(bbox_col[idx[j]])}"))

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


def _short_list(values: list, limit: int = 12) -> str:
    head = ", ".join(map(str, values[:limit]))
    return head + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# ------------------------------------------------------------------------------------ VOC boxes


def _xml_text(node: ET.Element | None) -> str | None:
    return None if node is None or node.text is None or not node.text.strip() else node.text.strip()


def _xml_number(node: ET.Element | None, tag: str) -> tuple[float | None, str | None]:
    text = _xml_text(node.find(tag)) if node is not None else None
    if text is None:
        return None, f"no <{tag}>"
    try:
        return float(text), None
    except ValueError:
        return None, f"<{tag}>{text[:20]}</{tag}>"


def _read_list(list_file: Path, probs: _Collector, what: str) -> list[str] | None:
    if not list_file.is_file():
        probs.add("missing file", list_file, f"{list_file}: image list does not exist; expected the {what} image "
                  f"set (check dataset.root and image_set).")
        return None
    try:
        return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, OSError) as err:
        probs.add("unreadable annotation file", list_file, f"{list_file}: cannot be read ({_reason(err)}); "
                  f"expected one image name per line.")
        return None


def _check_voc_det(name: str, roots: list[Path], image_sets: list[str], class_names: list[str], decode: bool,
                   probs: _Collector) -> SplitSummary:
    summary = SplitSummary(name, "voc_det", ", ".join(f"{r}/{s}" for r, s in zip(roots, image_sets)),
                           ignored_name="difficult")
    label_of = {c: i for i, c in enumerate(class_names)}
    boxes: list[tuple[float, float, float, float]] = []
    sizes: list[tuple[float, float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    owner: list[tuple[Path, int, list[float]]] = []  # (xml, object number, raw xmin/ymin/xmax/ymax)
    image_has_box: list[int] = []  # record index of each box
    records = 0
    for root, image_set in zip(roots, image_sets):
        names = _read_list(root / "ImageSets" / "Main" / f"{image_set}.txt", probs, "VOC detection")
        if names is None:
            continue
        xml_dir, jpg_dir = root / "Annotations", root / "JPEGImages"
        xmls, jpgs = _listdir(xml_dir), _listdir(jpg_dir)
        for folder, listing in ((xml_dir, xmls), (jpg_dir, jpgs)):
            if listing is None:
                probs.add("missing file", folder, f"{folder}: folder does not exist; expected it beside ImageSets "
                          f"in the VOC root {root}.")
        if xmls is None or jpgs is None:
            continue
        todo = []
        for image in names:
            xml, jpg = xml_dir / f"{image}.xml", jpg_dir / f"{image}.jpg"
            if not _exists(jpg_dir, jpgs, jpg.name):
                probs.add("missing image", jpg, f"{jpg}: image listed in {image_set}.txt does not exist; expected "
                          f"it in {jpg_dir}.")
                jpg = None
            if not _exists(xml_dir, xmls, xml.name):
                probs.add("missing file", xml, f"{xml}: annotation of an image listed in {image_set}.txt does not "
                          f"exist; expected a VOC xml.")
                continue
            todo.append((xml, jpg))
        jpg_paths = [jpg for _, jpg in todo if jpg is not None] if decode else []
        decoded = dict(zip(jpg_paths, _pool_map(lambda path: _open_image(path, True), jpg_paths)))
        for xml, jpg in todo:
            parsed = _parse_voc(xml, jpg, label_of, decoded.get(jpg), probs)
            if parsed is None:
                continue
            size, objects = parsed
            records += 1
            for number, raw, box, label, diff in objects:
                boxes.append(box)
                sizes.append(size)
                labels.append(label)
                difficult.append(diff)
                owner.append((xml, number, raw))
                image_has_box.append(records - 1)
    summary.images = records
    arr = np.asarray(boxes, np.float64).reshape(-1, 4)
    keep = _check_boxes(probs, arr, np.asarray(sizes, np.float64).reshape(-1, 2), lambda i: (
        owner[i][0], f"{owner[i][0]}: object {owner[i][1]} ({class_names[labels[i]]}) bndbox "
                     f"xmin/ymin/xmax/ymax {_fmt(owner[i][2])}"))
    lab, diff = np.asarray(labels, np.int64), np.asarray(difficult, bool)
    counts = np.bincount(lab[keep & ~diff], minlength=len(class_names))
    summary.per_class = {c: int(n) for c, n in zip(class_names, counts)}
    summary.ignored = int((keep & diff).sum())
    summary.images_without_objects = records - len(set(np.asarray(image_has_box)[keep & ~diff].tolist()))
    return summary


def _parse_voc(xml: Path, jpg: Path | None, label_of: dict[str, int],
               decoded: tuple[tuple[int, int] | None, str | None] | None, probs: _Collector):
    """(image (width, height), [(object number, raw coords, xyxy box, label, difficult)]) or None.
    `decoded`: _open_image's result for the jpg when decoding, else None."""
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as err:
        line, col = err.position
        probs.add("unreadable annotation file", xml, f"{xml}: not well-formed xml at line {line}, column {col}; "
                  f"expected a VOC annotation.")
        return None
    except OSError as err:
        probs.add("unreadable annotation file", xml, f"{xml}: cannot be read ({_reason(err)}); expected a VOC xml.")
        return None
    size_node = tree.find("size")
    width, w_err = _xml_number(size_node, "width")
    height, h_err = _xml_number(size_node, "height")
    actual = None
    if jpg is not None and decoded is not None:
        actual, reason = decoded
        if reason is not None:
            probs.add("unreadable image", jpg, f"{jpg}: cannot be decoded ({reason}); expected a readable image.")
    ok = True
    if size_node is None or w_err == "no <width>" or h_err == "no <height>":  # the loader reads the image header
        if jpg is not None and actual is None:
            actual, _ = _open_image(jpg, False)
        missing = "<size>" if size_node is None else "<width> or <height> in <size>"
        if actual is None:
            probs.add("missing field", xml, f"{xml}: has no {missing} and its image cannot be read; expected "
                      f"<size><width>W</width><height>H</height></size>.")
            return None
        probs.add("missing size", xml, f"{xml}: has no {missing}; the image header's {actual[0]}x{actual[1]} is "
                  f"used instead.", fatal=False)
        width, height = float(actual[0]), float(actual[1])
    else:
        for value, err, tag in ((width, w_err, "width"), (height, h_err, "height")):
            if err is not None or not (math.isfinite(value) and value > 0 and value == round(value)):
                shown = err if err is not None else f"<{tag}>{value:g}</{tag}>"
                probs.add("bad image size", xml, f"{xml}: <size> has {shown}; expected a positive whole number "
                          f"of pixels.")
                ok = False
        if ok and actual is not None and actual != (int(width), int(height)):
            probs.add("image size mismatch", jpg, f"{jpg}: is {actual[0]}x{actual[1]} but {xml.name} says "
                      f"{width:g}x{height:g}; expected the size the xml records.")
    objects = []
    for number, obj in enumerate(tree.findall("object"), 1):
        cls = _xml_text(obj.find("name"))
        if cls not in label_of:
            found = f"class {cls!r:.40}" if cls is not None else "no <name>"
            probs.add("unknown category", xml, f"{xml}: object {number} has {found}; expected one of "
                      f"{_short_list(list(label_of))}.")
            ok = False
            continue
        bnd = obj.find("bndbox")
        if bnd is None:
            probs.add("missing field", xml, f"{xml}: object {number} ({cls}) has no <bndbox>; expected "
                      f"<bndbox> with xmin, ymin, xmax and ymax.")
            ok = False
            continue
        coords = [_xml_number(bnd, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        errors = [e for _, e in coords if e is not None]
        if errors:
            probs.add("missing field", xml, f"{xml}: object {number} ({cls}) <bndbox> has {', '.join(errors)}; "
                      f"expected numeric xmin, ymin, xmax and ymax.")
            ok = False
            continue
        diff_text = _xml_text(obj.find("difficult"))
        try:
            diff = bool(int(float(diff_text))) if diff_text is not None else False
        except (ValueError, OverflowError):
            probs.add("wrong type", xml, f"{xml}: object {number} ({cls}) has <difficult>{diff_text[:20]}"
                      f"</difficult>; expected 0 or 1.")
            ok = False
            continue
        raw = [v for v, _ in coords]
        objects.append((number, raw, (raw[0] - 1.0, raw[1] - 1.0, raw[2], raw[3]), label_of[cls], diff))
    return ((width, height), objects) if ok else None


# ----------------------------------------------------------------------------- VOC segmentation


def _check_voc_seg(name: str, args: dict, class_names: list[str], decode: bool, probs: _Collector) -> SplitSummary:
    root, image_set = Path(str(args["root"])), str(args.get("image_set", "train"))
    summary = SplitSummary(name, "voc_seg", f"{root}/{image_set}", unit="pixels", ignored_name="ignore (255)")
    try:
        ds = VOCSegmentation(root, image_set, aug_root=args.get("aug_root"), class_names=class_names)
    except (FileNotFoundError, ValueError) as err:
        probs.add("missing file", root, " ".join(str(err).split()))
        return summary
    listings: dict[Path, set[str] | None] = {}

    def has(folder: Path, file: str) -> bool:
        if folder not in listings:
            listings[folder] = _listdir(folder)
        return _exists(folder, listings[folder], file)

    items = []
    for image_id in ds.ids:
        jpg = ds.root / "JPEGImages" / f"{image_id}.jpg"
        if not has(jpg.parent, jpg.name) and ds.sbd_dir is not None and has(ds.sbd_dir / "img", jpg.name):
            jpg = ds.sbd_dir / "img" / jpg.name
        mask = next((d / f"{image_id}.png" for d in ds.mask_dirs if has(d, f"{image_id}.png")), None)
        if mask is None and ds.sbd_dir is not None and has(ds.sbd_dir / "cls", f"{image_id}.mat"):
            mask = ds.sbd_dir / "cls" / f"{image_id}.mat"
        if not has(jpg.parent, jpg.name):
            probs.add("missing image", jpg, f"{jpg}: image listed in {image_set} does not exist; expected it in "
                      f"{jpg.parent}.")
            continue
        if mask is None:
            probs.add("missing mask", jpg, f"{ds.mask_dirs[0] / (image_id + '.png')}: mask of {jpg.name} does not "
                      f"exist; expected a PNG in {_short_list([str(d) for d in ds.mask_dirs])}.")
            continue
        items.append((jpg, mask))
    k = len(class_names)

    def check(item: tuple[Path, Path]) -> tuple[list[tuple[str, Path, str]], np.ndarray | None]:
        jpg, mask_path = item
        found: list[tuple[str, Path, str]] = []
        size, reason = _open_image(jpg, decode)
        if reason is not None:
            return [("unreadable image", jpg, f"{jpg}: cannot be decoded ({reason}); expected a readable image.")], None
        try:
            if mask_path.suffix == ".mat":
                mask = read_sbd_mat(mask_path)
            else:
                with Image.open(mask_path) as im:
                    if im.mode not in ("P", "L"):
                        return [("bad mask", mask_path, f"{mask_path}: is a '{im.mode}' image; expected a palette "
                                 f"('P') or grey ('L') PNG whose pixel values are class ids.")], None
                    if im.size != size:
                        return [("mask size mismatch", mask_path, f"{mask_path}: is {im.size[0]}x{im.size[1]} but "
                                 f"its image {jpg.name} is {size[0]}x{size[1]}; expected the same size.")], None
                    mask = np.asarray(im)
        except Exception as err:  # noqa: BLE001 -- any failure to read the file is reported, never raised
            return [("bad mask", mask_path, f"{mask_path}: cannot be decoded ({_reason(err)}); expected a "
                     f"class-id PNG.")], None
        if mask.shape != (size[1], size[0]):
            return [("mask size mismatch", mask_path, f"{mask_path}: is {mask.shape[1]}x{mask.shape[0]} but its "
                     f"image {jpg.name} is {size[0]}x{size[1]}; expected the same size.")], None
        counts = np.bincount(mask.ravel(), minlength=256)
        unknown = np.flatnonzero(counts[k:255]) + k
        if len(unknown):
            found.append(("unknown mask class", mask_path, f"{mask_path}: holds class id "
                          f"{_short_list(unknown.tolist(), 5)} ({int(counts[unknown].sum())} pixels); expected "
                          f"0..{k - 1} ({_short_list(class_names, 5)}) or 255 (ignore)."))
        return found, counts

    totals = np.zeros(256, np.int64)
    for found, counts in _pool_map(check, items):
        for kind, file, message in found:
            probs.add(kind, file, message)
        if counts is not None:
            summary.images += 1
            totals += counts[:256]
            summary.images_without_objects += int(counts[1:k].sum() == 0)
    summary.per_class = {c: int(n) for c, n in zip(class_names, totals)}
    summary.ignored, summary.ignored_name = int(totals[255]), "ignore (255)"
    return summary


# --------------------------------------------------------------------------------------- entry


def _dataset_node(dataset_cfg: Any) -> DictConfig:
    """The dataset config with its ${dataset.*} interpolations resolvable (a bare dict is wrapped)."""
    if isinstance(dataset_cfg, DictConfig):
        try:
            OmegaConf.to_container(dataset_cfg, resolve=True)
            return dataset_cfg
        except InterpolationKeyError:  # a dataset config on its own, outside a composed config
            dataset_cfg = OmegaConf.to_container(dataset_cfg, resolve=False)
        except OmegaConfBaseException:
            return dataset_cfg  # reported with the key's name by _split_args
    return OmegaConf.create({"dataset": dataset_cfg}).dataset


def _split_args(node: DictConfig, split: str) -> tuple[str, dict]:
    if OmegaConf.is_missing(node, "root"):
        raise ConfigError("dataset.root is not set; expected dataset.root=/path/to/the/data.")
    try:
        args = OmegaConf.to_container(node[split], resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"dataset.{split} cannot be resolved ({_reason(err)}); expected a dataset=... config "
                          f"whose paths are set.") from None
    if not isinstance(args, dict) or "_target_" not in args:
        raise ConfigError(f"dataset.{split} has no _target_; expected one of {', '.join(LAYOUTS)}.")
    args.pop("transforms", None)
    return str(args.pop("_target_")), args


def check_dataset(dataset_cfg: Any, decode_images: bool = False, max_examples: int = 5) -> DataReport:
    """Check the files behind `dataset_cfg.train` and `dataset_cfg.val` (a Hydra dataset config: cfg.dataset,
    or the same as a plain dict). `decode_images` also decodes every image (slow: the pixels are read) and
    compares its size with the annotation's. Raises ConfigError only for a config that names no data."""
    start = time.perf_counter()
    node = _dataset_node(dataset_cfg)
    task = str(node.get("task", ""))
    num_classes = node.get("num_classes")
    splits: list[tuple[str, str, dict]] = []
    for split in ("train", "val"):
        if node.get(split) is None:
            continue
        target, args = _split_args(node, split)
        if target not in LAYOUTS:
            raise ConfigError(f"dataset.{split}._target_={target} has no checker; expected one of "
                              f"{', '.join(LAYOUTS)}.")
        if LAYOUTS[target][0] != task:
            raise ConfigError(f"dataset.task={task or None} but dataset.{split}._target_={target} reads "
                              f"{LAYOUTS[target][0]} data; expected them to agree.")
        same = next((i for i, (_, t, a) in enumerate(splits) if t == target and a == args), None)
        if same is not None:
            splits[same] = (f"{splits[same][0]}+{split}", target, args)
        else:
            splits.append((split, target, args))
    if not splits:
        raise ConfigError("the dataset config has neither 'train' nor 'val'; expected a dataset=... config group.")
    layout = LAYOUTS[splits[0][1]][1]
    report = DataReport(task=task, layout=layout)
    probs = _Collector(report, max_examples)
    for name, target, args in splits:
        layout = LAYOUTS[target][1]
        if layout == "coco":
            report.splits.append(_check_coco(name, Path(str(args["image_dir"])), Path(str(args["ann_file"])),
                                             decode_images, probs, num_classes if task == "detection" else None))
        elif layout == "voc_det":
            root = args["root"]
            roots = [Path(str(root))] if isinstance(root, str) else [Path(str(r)) for r in root]
            image_set = args.get("image_set", "train")
            sets = [image_set] * len(roots) if isinstance(image_set, str) else [str(s) for s in image_set]
            report.splits.append(_check_voc_det(name, roots, sets, list(args.get("class_names") or VOC_DET_CLASSES),
                                                decode_images, probs))
        else:
            names = list(args.get("class_names") or VOC_SEG_CLASSES)
            if num_classes is not None and int(num_classes) != len(names):
                probs.add("class count mismatch", args["root"], f"{args['root']}: the masks use {len(names)} "
                          f"classes ({_short_list(names, 5)}) but dataset.num_classes={num_classes}; expected "
                          f"them to agree.")
            report.splits.append(_check_voc_seg(name, args, names, decode_images, probs))
    report.seconds = time.perf_counter() - start
    return report


@hydra.main(config_path="../conf", config_name="check_data", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.dataset.get("prepare") is not None:
        try:
            instantiate(cfg.dataset.prepare)
        except InstantiationException as err:  # Hydra's wrapper hides a user error's one sentence
            if isinstance(err.__cause__, USER_ERRORS):
                raise err.__cause__ from None
            raise
    report = check_dataset(cfg.dataset, decode_images=bool(cfg.decode), max_examples=int(cfg.max_examples))
    print(report.summary(), flush=True)
    report.raise_if_fatal()


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "check_data")


if __name__ == "__main__":
    cli()
