"""What every evaluation writes beside its metrics: per-class tables, PR curves, confusion matrices, the worst
images, gathered in one report.html (pictures embedded) that links the config and checkpoint it came from.

    report = write_evaluation_report(evaluator, val_set, metrics, out_dir, title=..., checkpoint=..., config=...)
    report.pictures   # name -> PIL image, for TensorBoard

Detection reads the evaluator's `per_class_ap()`, `precision_recall()` and `image_errors()`; segmentation its
confusion `matrix` and, when it was wrapped in `WorstImages` during the pass, the worst images it kept.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.analysis.html_report import Page, Picture, Table, relative_link, write_page
from tasks.analysis.plots import (
    class_bars_figure,
    class_colours,
    confusion_matrix_figure,
    pr_curves_figure,
    save_figure,
)
from tasks.analysis.visualize import denormalise, draw_detections, draw_mask, image_grid, side_by_side
from tasks.analysis.worst_images import WorstImages
from tasks.detection.confusion import confusion_from_errors

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Report:
    directory: Path
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    pictures: dict[str, Image.Image] = field(default_factory=dict)


def for_report(evaluator: Any, keep: int = 8) -> Any:
    """The evaluator to run the pass with: segmentation evaluators are wrapped so the worst images are kept."""
    return WorstImages(evaluator, keep) if hasattr(evaluator, "matrix") else evaluator


def normalisation(config: Mapping[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The val inputs' (mean, std) from a training config (dataset.val.transforms), ImageNet's by default."""
    transforms = (((config or {}).get("dataset") or {}).get("val") or {}).get("transforms") or {}
    return (tuple(float(v) for v in transforms.get("mean") or IMAGENET_MEAN),
            tuple(float(v) for v in transforms.get("std") or IMAGENET_STD))


def write_config(config: Mapping[str, Any], path: str | Path) -> Path:
    """The (resolved) config the evaluated model was trained with, as YAML beside the report."""
    from omegaconf import OmegaConf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(dict(config)), path, resolve=False)
    return path


# -- images of the dataset ------------------------------------------------------------------------------
def _index_of(dataset: Any, image_id: Any) -> int | None:
    for attribute in ("image_ids", "ids"):
        ids = getattr(dataset, attribute, None)
        if ids is not None:
            lookup = {str(i): n for n, i in enumerate(ids)}
            return lookup.get(str(image_id))
    return None


def original_image(dataset: Any, image_id: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray | None:
    """The image as stored on disk (detection predictions and ground truth are in its pixels)."""
    from tasks.detection.coco import load_rgb

    if hasattr(dataset, "coco") and hasattr(dataset, "image_dir") and int(image_id) in dataset.coco.imgs:
        return load_rgb(Path(dataset.image_dir) / dataset.coco.imgs[int(image_id)]["file_name"])
    records = getattr(dataset, "records", None)
    if records is not None and isinstance(image_id, (int, np.integer)) and 0 <= int(image_id) < len(records):
        record = records[int(image_id)]
        return load_rgb(record.root / "JPEGImages" / f"{record.name}.jpg")
    index = _index_of(dataset, image_id)
    if index is None:
        return None
    tensor, target = dataset[index]  # another dataset: its model input, back at the original size
    picture = Image.fromarray(denormalise(tensor, mean, std))
    h, w = (int(v) for v in target["orig_size"])
    return np.asarray(picture.resize((w, h), Image.Resampling.BILINEAR))


def image_for_mask(dataset: Any, image_id: Any, shape: tuple[int, int], mean: Sequence[float],
                   std: Sequence[float]) -> np.ndarray | None:
    """The picture behind a mask of `shape`: the model input (denormalised) when it has that size, else the
    image on disk; resized to `shape` when neither matches."""
    index = _index_of(dataset, image_id)
    if index is None:
        return None
    tensor, _ = dataset[index]
    picture = denormalise(tensor, mean, std)
    if picture.shape[:2] == tuple(shape):
        return picture
    if hasattr(dataset, "load"):
        picture = dataset.load(index)[0]
        if picture.shape[:2] == tuple(shape):
            return picture
    return np.asarray(Image.fromarray(picture).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


# -- detection -------------------------------------------------------------------------------------------
def _detection(evaluator: Any, dataset: Any, metrics: Mapping[str, float], directory: Path, mean, std,
               max_images: int, score_threshold: float) -> tuple[list[Table], list[Picture], list[str]]:
    names = list(evaluator.class_names)
    per_class = evaluator.per_class_ap()
    errors = evaluator.image_errors(iou_threshold=0.5, score_threshold=score_threshold)
    matrix = confusion_from_errors(list(errors.values()), len(names))
    truth_counts = matrix[:len(names)].sum(1)
    ap_keys = list(next(iter(per_class.values())).keys()) if per_class else ["AP50"]
    headline = ap_keys[0]
    rows = [[name, *[per_class[name][k] for k in ap_keys], int(truth_counts[k]), int(matrix[k, k]),
             int(matrix[k, -1]), int(matrix[-1, k]), int(matrix[k, :-1].sum() - matrix[k, k])]
            for k, name in enumerate(names)]
    table = Table("per-class results",
                  ["class", *ap_keys, "ground truth", "found", "missed", "false detections", "confused"], rows,
                  caption=(f"{', '.join(ap_keys)} from the evaluator; the counts match detections scoring >= "
                           f"{score_threshold} to ground truth at IoU >= 0.5 (same class first, then any class); "
                           f"crowd / difficult boxes are not counted. Red: {headline} below half the mean."),
                  highlight_below=0.5 * float(np.nanmean([r[1] for r in rows])) if rows else None)
    pictures = []
    colours = class_colours(names)
    bars = {name: per_class[name][headline] for name in names}
    save_figure(class_bars_figure(bars, f"{headline} per class", headline, colours=colours),
                directory / "per_class_ap.png")
    pictures.append(Picture(f"{headline} per class", directory / "per_class_ap.png",
                            "In the classes' order; n/a: no ground truth in the evaluated images."))
    recall, curves = evaluator.precision_recall()
    stacked = np.vstack([c for c in curves.values() if not np.all(np.isnan(c))] or [np.full_like(recall, np.nan)])
    overall = np.nanmean(stacked, axis=0) if not np.all(np.isnan(stacked)) else None
    ap50 = {name: per_class[name].get("AP50", per_class[name][headline]) for name in names}
    save_figure(pr_curves_figure(recall, curves, ap50, overall, "precision-recall at IoU 0.5",
                                 dict(zip(names, colours))), directory / "pr_curves.png")
    pictures.append(Picture("precision-recall curves", directory / "pr_curves.png",
                            "Interpolated precision at each recall, per class and averaged over the classes "
                            "(black), IoU 0.5."))
    save_figure(confusion_matrix_figure(matrix, [*names, "background"], title=(
        f"detections (score >= {score_threshold}) vs ground truth, IoU >= 0.5")), directory / "confusion_matrix.png")
    pictures.append(Picture("confusion matrix", directory / "confusion_matrix.png",
                            "Rows: the truth, normalised to sum to 1; the 'background' column is ground truth "
                            "missed, the 'background' row false detections (their split over the predicted "
                            "classes). Numbers in cells are shares of the row."))
    worst = sorted(((e.errors, str(i), i) for i, e in errors.items() if e.errors), key=lambda t: (-t[0], t[1]))
    tiles, captions = [], []
    for _, _, image_id in worst[:max_images]:
        image = original_image(dataset, image_id, mean, std)
        if image is None:
            continue
        gt_boxes, gt_labels, _ = evaluator.ground_truth_of(image_id)
        boxes, scores, labels = evaluator.detections_of(image_id)
        truth = draw_detections(image, gt_boxes, None, gt_labels, names)
        predicted = draw_detections(image, boxes, scores, labels, names, score_threshold)
        tiles.append(side_by_side([truth, predicted]))
        e = errors[image_id]
        captions.append(f"{image_id}: {e.missed} missed, {e.false_detections} false, {e.confused} confused")
    notes = []
    if tiles:
        image_grid(tiles, captions, columns=2, tile_width=480).save(directory / "worst_images.png", compress_level=1)
        pictures.append(Picture("worst images", directory / "worst_images.png",
                                f"The images with the most errors (missed + false + confused at score >= "
                                f"{score_threshold}): ground truth left, predictions right."))
    else:
        notes.append(f"No image has an error at score >= {score_threshold}: no worst-images grid.")
    return [table], pictures, notes


# -- segmentation ----------------------------------------------------------------------------------------
def _segmentation(evaluator: Any, dataset: Any, metrics: Mapping[str, float], directory: Path, mean, std,
                  max_images: int) -> tuple[list[Table], list[Picture], list[str]]:
    names = list(evaluator.class_names)
    matrix = np.asarray(evaluator.matrix, np.int64)
    tp = np.diag(matrix).astype(np.float64)
    truth, predicted = matrix.sum(1).astype(np.float64), matrix.sum(0).astype(np.float64)
    union = truth + predicted - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    recall = np.where(truth > 0, tp / np.maximum(truth, 1), np.nan)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
    share = truth / max(truth.sum(), 1)
    rows = [[name, float(iou[k]), float(recall[k]), float(precision[k]), float(share[k])]
            for k, name in enumerate(names)]
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    table = Table("per-class results", ["class", "IoU", "recall (accuracy)", "precision", "share of pixels"], rows,
                  caption=f"From the evaluator's confusion matrix. Red: IoU below half the mIoU ({miou:.3f}).",
                  highlight_below=0.5 * miou if np.isfinite(miou) else None)
    colours = class_colours(names, offset=-1)
    save_figure(confusion_matrix_figure(matrix, names, title="pixels: truth vs prediction (rows sum to 1)"),
                directory / "confusion_matrix.png")
    save_figure(class_bars_figure(dict(zip(names, iou.tolist())), "IoU per class", "IoU", colours=colours),
                directory / "per_class_iou.png")
    pictures = [
        Picture("confusion matrix", directory / "confusion_matrix.png",
                "Rows: the true class of each pixel, normalised to sum to 1 (the diagonal is each class's "
                "recall); columns: what the model predicted."),
        Picture("IoU per class", directory / "per_class_iou.png", "n/a: the class is in neither truth nor prediction."),
    ]
    notes = []
    worst = evaluator.worst() if isinstance(evaluator, WorstImages) else []
    tiles, captions = [], []
    for image_id, score, truth_mask, predicted_mask in worst[:max_images]:
        image = image_for_mask(dataset, image_id, truth_mask.shape, mean, std)
        if image is None:
            continue
        tiles.append(side_by_side([image, draw_mask(image, truth_mask, class_names=names),
                                   draw_mask(image, predicted_mask, class_names=names)]))
        captions.append(f"{image_id}: mIoU {score:.3f}")
    if tiles:
        image_grid(tiles, captions, columns=2, tile_width=3 * 160).save(directory / "worst_images.png",
                                                                          compress_level=1)
        pictures.append(Picture("worst images", directory / "worst_images.png",
                                "The images with the lowest mIoU (over the classes in their truth or prediction): "
                                "image | truth | prediction."))
    else:
        notes.append("The worst images were not recorded in this pass (evaluator not wrapped by for_report).")
    return [table], pictures, notes


# -- the report ------------------------------------------------------------------------------------------
def write_evaluation_report(evaluator: Any, dataset: Any, metrics: Mapping[str, float], directory: str | Path,
                            title: str, checkpoint: str | Path | None = None, config: str | Path | None = None,
                            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                            max_images: int = 8, score_threshold: float = 0.3,
                            notes: Sequence[str] = ()) -> Report:
    """Write the pictures and report.html into `directory`; `mean`/`std` undo the inputs' normalisation."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mean, std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
    if hasattr(evaluator, "per_class_ap"):
        tables, pictures, extra = _detection(evaluator, dataset, metrics, directory, mean, std, max_images,
                                             score_threshold)
    elif hasattr(evaluator, "matrix"):
        tables, pictures, extra = _segmentation(evaluator, dataset, metrics, directory, mean, std, max_images)
    else:
        raise TypeError(f"write_evaluation_report cannot read a {type(evaluator).__name__}; expected a detection "
                        f"evaluator with per_class_ap() or a segmentation one with a confusion matrix.")
    headline = {k: float(v) for k, v in metrics.items() if "/" not in k}
    links = {"config": relative_link(config, directory), "checkpoint": relative_link(checkpoint, directory)}
    html = write_page(Page(title, headline, links, [*notes, *extra], tables, pictures), directory / "report.html")
    figures = {p.path.stem: p.path for p in pictures}
    report = Report(directory, html, figures)
    for name, path in figures.items():
        with Image.open(path) as picture:
            report.pictures[name] = picture.convert("RGB")
    return report


__all__ = ["Report", "for_report", "write_evaluation_report", "original_image", "image_for_mask", "normalisation",
           "write_config"]
