"""Check a VOC detection tree: ImageSets/Main lists, Annotations/*.xml and JPEGImages."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

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
from tasks.detection.voc import voc_image_names
from tasks.errors import DataError


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


def _read_list(list_file: Path, probs: Collector, what: str) -> list[str] | None:
    if not list_file.is_file():
        probs.add("missing file", list_file, f"{list_file}: image list does not exist; expected the {what} image "
                  f"set (check dataset.root and image_set).")
        return None
    try:
        return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, OSError) as err:
        probs.add("unreadable annotation file", list_file, f"{list_file}: cannot be read ({describe_error(err)}); "
                  f"expected one image name per line.")
        return None


def check_voc_det(name: str, roots: list[Path], image_sets: list[str], class_names: list[str], decode: bool,
                   probs: Collector, holdout: str | None = None, val_fraction: float = 0.2, split_seed: int = 0,
                   other_classes: str = "error") -> SplitSummary:
    """`holdout`/`val_fraction`/`split_seed` and `other_classes` as VOCDetection takes them."""
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
    left_out: Counter | None = Counter() if other_classes == "ignore" else None
    for root, image_set in zip(roots, image_sets):
        if holdout is None:
            names = _read_list(root / "ImageSets" / "Main" / f"{image_set}.txt", probs, "VOC detection")
        else:
            try:
                names = voc_image_names(root, image_set, holdout, val_fraction, split_seed)
            except DataError as err:
                probs.add("missing file", root / "Annotations", str(err))
                names = None
        if names is None:
            continue
        xml_dir, jpg_dir = root / "Annotations", root / "JPEGImages"
        xmls, jpgs = listdir(xml_dir), listdir(jpg_dir)
        for folder, listing in ((xml_dir, xmls), (jpg_dir, jpgs)):
            if listing is None:
                probs.add("missing file", folder, f"{folder}: folder does not exist; expected it beside ImageSets "
                          f"in the VOC root {root}.")
        if xmls is None or jpgs is None:
            continue
        todo = []
        for image in names:
            xml, jpg = xml_dir / f"{image}.xml", jpg_dir / f"{image}.jpg"
            if not exists(jpg_dir, jpgs, jpg.name):
                probs.add("missing image", jpg, f"{jpg}: image listed in {image_set}.txt does not exist; expected "
                          f"it in {jpg_dir}.")
                jpg = None
            if not exists(xml_dir, xmls, xml.name):
                probs.add("missing file", xml, f"{xml}: annotation of an image listed in {image_set}.txt does not "
                          f"exist; expected a VOC xml.")
                continue
            todo.append((xml, jpg))
        jpg_paths = [jpg for _, jpg in todo if jpg is not None]  # headers (and JPEG ends) even without decode
        decoded = dict(zip(jpg_paths, pool_map(lambda path: open_image(path, decode), jpg_paths)))
        for xml, jpg in todo:
            parsed = _parse_voc(xml, jpg, label_of, decoded.get(jpg), probs, left_out)
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
    if left_out:
        probs.add("other classes left out", roots[0], f"{name}: {sum(left_out.values())} objects of classes outside "
                  f"class_names were left out ({', '.join(f'{n} {c}' for c, n in left_out.most_common(8))}).",
                  fatal=False)
    arr = np.asarray(boxes, np.float64).reshape(-1, 4)
    keep = check_boxes(probs, arr, np.asarray(sizes, np.float64).reshape(-1, 2), lambda i: (
        owner[i][0], f"{owner[i][0]}: object {owner[i][1]} ({class_names[labels[i]]}) bndbox "
                     f"xmin/ymin/xmax/ymax {fmt(owner[i][2])}"))
    lab, diff = np.asarray(labels, np.int64), np.asarray(difficult, bool)
    counts = np.bincount(lab[keep & ~diff], minlength=len(class_names))
    summary.per_class = {c: int(n) for c, n in zip(class_names, counts)}
    absent = [c for c, n in summary.per_class.items() if n == 0]
    if left_out is not None and absent and records and name.startswith("train"):
        found = ", ".join(sorted(set(left_out) | {c for c, n in summary.per_class.items() if n}))
        probs.add("missing class", roots[0], f"{name}: class_names {absent} have no object in this split; "
                  f"expected names as the xml writes them ({found}).")
    summary.ignored = int((keep & diff).sum())
    summary.images_without_objects = records - len(set(np.asarray(image_has_box)[keep & ~diff].tolist()))
    return summary


def _parse_voc(xml: Path, jpg: Path | None, label_of: dict[str, int],
               decoded: tuple[tuple[int, int] | None, str | None] | None, probs: Collector,
               left_out: Counter | None = None):
    """(image (width, height), [(object number, raw coords, xyxy box, label, difficult)]) or None.
    `decoded`: open_image's result for the jpg when decoding, else None. With `left_out`, objects of other
    classes are counted there instead of reported."""
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as err:
        line, col = err.position
        probs.add("unreadable annotation file", xml, f"{xml}: not well-formed xml at line {line}, column {col}; "
                  f"expected a VOC annotation.")
        return None
    except OSError as err:
        probs.add("unreadable annotation file", xml,
                  f"{xml}: cannot be read ({describe_error(err)}); expected a VOC xml.")
        return None
    size_node = tree.find("size")
    width, w_err = _xml_number(size_node, "width")
    height, h_err = _xml_number(size_node, "height")
    actual = None
    if jpg is not None and decoded is not None:
        actual, why = decoded
        if why is not None:
            probs.add("unreadable image", jpg, f"{jpg}: cannot be decoded ({why}); expected a readable image.")
    ok = True
    if size_node is None or w_err == "no <width>" or h_err == "no <height>":  # the loader reads the image header
        if jpg is not None and actual is None:
            actual, _ = open_image(jpg, False)
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
        if cls not in label_of and cls is not None and left_out is not None:
            left_out[cls] += 1
            continue
        if cls not in label_of:
            found = f"class {cls!r:.40}" if cls is not None else "no <name>"
            probs.add("unknown category", xml, f"{xml}: object {number} has {found}; expected one of "
                      f"{short_list(list(label_of))}.")
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

