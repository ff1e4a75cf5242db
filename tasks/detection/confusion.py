"""Where a detector's errors go: a confusion matrix with a background row and column, and errors per image.

Per image, the detections scoring >= `score_threshold` are taken in descending score order; each one takes
the unmatched ground-truth box of its own class with the highest IoU >= `iou_threshold`; failing that, the
unmatched box of any other class with the highest such IoU (a class confusion); failing that it is a false
detection (truth = background). Ground truth left unmatched is missed (prediction = background). A detection
that falls on an ignored box (COCO crowd, VOC difficult) is neither right nor wrong, and an ignored box is
never missed. mmdetection's confusion_matrix.py and ultralytics' ConfusionMatrix count the same cells; the
same-class-first order keeps a correct detection from being counted as a confusion with a neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageErrors:
    """One image's matches: `pairs` are (truth row, prediction column), background = num_classes."""

    pairs: list[tuple[int, int]]
    num_classes: int

    @property
    def missed(self) -> int:
        return sum(1 for t, p in self.pairs if p == self.num_classes)

    @property
    def false_detections(self) -> int:
        return sum(1 for t, p in self.pairs if t == self.num_classes)

    @property
    def confused(self) -> int:
        return sum(1 for t, p in self.pairs if self.num_classes not in (t, p) and t != p)

    @property
    def errors(self) -> int:
        return sum(1 for t, p in self.pairs if t != p)


def match_image(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_ignore: np.ndarray, det_boxes: np.ndarray,
                det_scores: np.ndarray, det_labels: np.ndarray, num_classes: int, iou_threshold: float = 0.5,
                score_threshold: float = 0.3) -> ImageErrors:
    """The module docstring's matching on one image (boxes xyxy in the same pixels)."""
    from tasks.detection.voc_eval import box_iou  # here: voc_eval's evaluator builds on this module

    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    gt_ignore = np.asarray(gt_ignore, bool).reshape(-1)
    keep = np.asarray(det_scores, np.float64).reshape(-1) >= score_threshold
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)[keep]
    det_labels = np.asarray(det_labels, np.int64).reshape(-1)[keep]
    order = np.argsort(-np.asarray(det_scores, np.float64).reshape(-1)[keep], kind="stable")
    ious = box_iou(det_boxes, gt_boxes) if len(det_boxes) and len(gt_boxes) else np.zeros((len(det_boxes), 0))
    matched = np.zeros(len(gt_boxes), bool)
    background = num_classes
    pairs: list[tuple[int, int]] = []
    for d in order:
        label = int(det_labels[d])
        candidates = (ious[d] >= iou_threshold) & ~matched
        same = candidates & (gt_labels == label)
        chosen = same if same.any() else candidates
        if not chosen.any():
            pairs.append((background, label))
            continue
        g = int(np.argmax(np.where(chosen, ious[d], -1.0)))
        if gt_ignore[g]:
            continue  # on a crowd / difficult box: not counted (the box may take other detections too)
        matched[g] = True
        pairs.append((int(gt_labels[g]), label))
    pairs += [(int(gt_labels[g]), background) for g in np.flatnonzero(~matched & ~gt_ignore)]
    return ImageErrors(pairs, num_classes)


class DetectionErrors:
    """The confusion matrix and per-image errors of a detection evaluator that provides `num_classes`,
    `image_ids()`, `ground_truth_of(image_id)` -> (boxes, labels, ignore) and `detections_of(image_id)` ->
    (boxes, scores, labels), all in original pixels."""

    num_classes: int

    def image_ids(self) -> list:  # pragma: no cover - provided by the evaluator
        raise NotImplementedError

    def ground_truth_of(self, image_id) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def detections_of(self, image_id) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def image_errors(self, iou_threshold: float = 0.5, score_threshold: float = 0.3) -> dict:
        """image_id -> ImageErrors for every image seen, in the order they were seen."""
        return {image_id: match_image(*self.ground_truth_of(image_id), *self.detections_of(image_id),
                                      num_classes=self.num_classes, iou_threshold=iou_threshold,
                                      score_threshold=score_threshold)
                for image_id in self.image_ids()}

    def confusion_matrix(self, iou_threshold: float = 0.5, score_threshold: float = 0.3) -> np.ndarray:
        """int64 [K+1, K+1], rows truth, columns prediction, the last row/column background."""
        return confusion_from_errors(list(self.image_errors(iou_threshold, score_threshold).values()),
                                     self.num_classes)


def confusion_from_errors(errors: list[ImageErrors], num_classes: int) -> np.ndarray:
    """int64 [K+1, K+1]: rows the truth, columns the prediction, index K = background."""
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for image in errors:
        for t, p in image.pairs:
            matrix[t, p] += 1
    return matrix


__all__ = ["DetectionErrors", "ImageErrors", "match_image", "confusion_from_errors"]
