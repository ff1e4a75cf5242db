"""Check a VOC segmentation tree: image lists, JPEGImages and palette masks (SBD trainaug included)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.datasets.report import (
    Collector,
    SplitSummary,
    describe_error,
    exists,
    listdir,
    open_image,
    pool_map,
    short_list,
)
from tasks.segmentation.voc import VOCSegmentation, read_sbd_mat


def check_voc_seg(name: str, args: dict, class_names: list[str], decode: bool, probs: Collector) -> SplitSummary:
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
            listings[folder] = listdir(folder)
        return exists(folder, listings[folder], file)

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
                      f"exist; expected a PNG in {short_list([str(d) for d in ds.mask_dirs])}.")
            continue
        items.append((jpg, mask))
    k = len(class_names)

    def check(item: tuple[Path, Path]) -> tuple[list[tuple[str, Path, str]], np.ndarray | None]:
        jpg, mask_path = item
        found: list[tuple[str, Path, str]] = []
        size, reason = open_image(jpg, decode)
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
            return [("bad mask", mask_path, f"{mask_path}: cannot be decoded ({describe_error(err)}); expected a "
                     f"class-id PNG.")], None
        if mask.shape != (size[1], size[0]):
            return [("mask size mismatch", mask_path, f"{mask_path}: is {mask.shape[1]}x{mask.shape[0]} but its "
                     f"image {jpg.name} is {size[0]}x{size[1]}; expected the same size.")], None
        counts = np.bincount(mask.ravel(), minlength=256)
        unknown = np.flatnonzero(counts[k:255]) + k
        if len(unknown):
            found.append(("unknown mask class", mask_path, f"{mask_path}: holds class id "
                          f"{short_list(unknown.tolist(), 5)} ({int(counts[unknown].sum())} pixels); expected "
                          f"0..{k - 1} ({short_list(class_names, 5)}) or 255 (ignore)."))
        return found, counts

    totals = np.zeros(256, np.int64)
    for found, counts in pool_map(check, items):
        for kind, file, message in found:
            probs.add(kind, file, message)
        if counts is not None:
            summary.images += 1
            totals += counts[:256]
            summary.images_without_objects += int(counts[1:k].sum() == 0)
    summary.per_class = {c: int(n) for c, n in zip(class_names, totals)}
    summary.ignored, summary.ignored_name = int(totals[255]), "ignore (255)"
    return summary

