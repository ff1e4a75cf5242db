"""What the model will see: a grid of a split's images with their ground truth drawn (optionally after the
training augmentations), and the label statistics of the split (`python -m tasks.browse`)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.analysis.evaluation_report import original_image
from tasks.analysis.plots import detection_label_stats_figure, save_figure, segmentation_label_stats_figure
from tasks.analysis.visualize import denormalise, draw_detections, draw_mask, image_grid
from tasks.detection.device_augment import PlannedBatch, PlannedImage
from tasks.errors import ConfigError

log = logging.getLogger(__name__)


def default_box_sizes(head: Mapping[str, Any] | None) -> np.ndarray | None:
    """The SSDLite head's default boxes as unique normalised (w, h) pairs, or None for another head."""
    if not head or "min_scale" not in head or "extra_depths" not in head:
        return None
    from heads.ssdlite.anchors import DefaultBoxes

    boxes = DefaultBoxes(len(head["in_features"]) + len(head["extra_depths"]), float(head["min_scale"]),
                         float(head["max_scale"]), tuple(float(r) for r in head["aspect_ratios"]),
                         bool(head.get("reduced_first_map", True)), float(head.get("first_map_scale", 0.1)),
                         bool(head.get("clip_anchors", True)))
    return np.unique(np.concatenate([wh.numpy() for wh in boxes.wh_pairs]).round(6), axis=0)


def _image_size(dataset: Any, index: int) -> tuple[int, int]:
    """(height, width) without decoding the image."""
    if hasattr(dataset, "coco") and hasattr(dataset, "image_ids"):
        info = dataset.coco.imgs[dataset.image_ids[index]]
        return int(info["height"]), int(info["width"])
    record = dataset.records[index]
    return int(record.height), int(record.width)


def _stats_indices(size: int, limit: int | None) -> np.ndarray:
    if limit is None or size <= limit:
        return np.arange(size)
    return np.unique(np.linspace(0, size - 1, int(limit)).round().astype(np.int64))  # spread over the split


def detection_statistics(dataset: Any, head: Mapping[str, Any] | None, title: str, limit: int | None = None):
    widths, heights, labels = [], [], []
    indices = _stats_indices(len(dataset), limit)
    for index in indices:
        boxes, box_labels = dataset.get_annotations(int(index))
        h, w = _image_size(dataset, int(index))
        widths.append((boxes[:, 2] - boxes[:, 0]) / w)
        heights.append((boxes[:, 3] - boxes[:, 1]) / h)
        labels.append(box_labels)
    suffix = f" ({len(indices):,} of {len(dataset):,} images)" if len(indices) < len(dataset) else ""
    return detection_label_stats_figure(np.concatenate(widths) if widths else np.zeros(0),
                                        np.concatenate(heights) if heights else np.zeros(0),
                                        np.concatenate(labels) if labels else np.zeros(0, np.int64),
                                        dataset.class_names, default_box_sizes(head), title + suffix)


def segmentation_statistics(dataset: Any, title: str, ignore_index: int = 255, limit: int | None = None):
    k = len(dataset.class_names)
    counts = np.zeros(256, np.int64)
    images_with = np.zeros(k, np.int64)
    indices = _stats_indices(len(dataset), limit)
    for index in indices:
        mask = np.asarray(dataset.load(int(index))[1])
        per_image = np.bincount(mask.reshape(-1), minlength=256)
        counts += per_image
        images_with += per_image[:k] > 0
    suffix = f" ({len(indices):,} of {len(dataset):,} images)" if len(indices) < len(dataset) else ""
    return segmentation_label_stats_figure(counts[:k], images_with, int(counts[ignore_index]), len(indices),
                                           dataset.class_names, title + suffix)


def _seed_transforms(dataset: Any, seed: int) -> None:
    transforms = getattr(dataset, "transforms", None)
    if hasattr(transforms, "set_random_seed"):
        transforms.set_random_seed(seed)


def sample_pictures(dataset: Any, task: str, indices: Sequence[int], augment: bool, mean: Sequence[float],
                    std: Sequence[float]) -> tuple[list, list[str]]:
    """Each sampled image with its ground truth drawn: as stored, or as the model gets it after `augment`."""
    pictures, captions = [], []
    names = dataset.class_names
    for index in indices:
        if augment:
            tensor, target = dataset[int(index)]
            if isinstance(tensor, PlannedImage):  # device_augment=true: painted here as the engine paints a batch
                images, targets = dataset.transforms.device_augment.paint(PlannedBatch.collate([tensor]), [target])
                tensor, target = images[0], targets[0]
            image = denormalise(tensor, mean, std)
            image_id = target.get("image_id", index)
        if task == "detection":
            if augment:
                h, w = image.shape[:2]
                boxes = target["boxes"].numpy() * np.array([w, h, w, h], np.float32)
                labels = target["labels"].numpy()
            else:
                image_id = dataset.image_ids[int(index)]
                image = original_image(dataset, image_id, mean, std)
                boxes, labels = dataset.get_annotations(int(index))
            pictures.append(draw_detections(image, boxes, None, labels, names))
            captions.append(f"{image_id}: {len(boxes)} boxes, {image.shape[1]}x{image.shape[0]}")
        else:
            if augment:
                mask = target["mask"].numpy()
            else:
                image, mask = dataset.load(int(index))
                image_id = dataset.ids[int(index)]
            pictures.append(draw_mask(image, mask, class_names=names))
            captions.append(f"{image_id}: {image.shape[1]}x{image.shape[0]}")
    return pictures, captions


def browse(dataset: Any, task: str, split: str, out_dir: str | Path, n: int = 16, augment: bool = False,
           seed: int = 0, head: Mapping[str, Any] | None = None, mean: Sequence[float] = (0.485, 0.456, 0.406),
           std: Sequence[float] = (0.229, 0.224, 0.225), stats_images: int | None = None,
           columns: int | None = None, tile_width: int = 320) -> dict[str, Path]:
    """Writes samples_<split>[_augmented].png and labels_<split>.png into `out_dir`; returns their paths."""
    if n < 1:
        raise ConfigError(f"n={n} must be a positive number of images.")
    if task not in ("detection", "segmentation"):
        raise ConfigError(f"dataset.task={task!r} is not browsable; expected detection or segmentation.")
    if len(dataset) == 0:
        raise ConfigError(f"the {split} split holds no images.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    if augment:
        _seed_transforms(dataset, seed)
    pictures, captions = sample_pictures(dataset, task, indices, augment, mean, std)
    samples = out_dir / f"samples_{split}{'_augmented' if augment else ''}.png"
    image_grid(pictures, captions, columns=columns, tile_width=tile_width).save(samples, compress_level=1)
    title = f"{split} split labels"
    figure = (detection_statistics(dataset, head, title, stats_images) if task == "detection"
              else segmentation_statistics(dataset, title, limit=stats_images))
    labels = out_dir / f"labels_{split}.png"
    save_figure(figure, labels)
    return {"samples": samples, "labels": labels}


__all__ = ["browse", "default_box_sizes", "detection_statistics", "segmentation_statistics", "sample_pictures"]
