"""PASCAL VOC detection AP (VOCdevkit's VOCevaldet algorithm).

Box convention: boxes here are continuous 0-based pixel coordinates, as VOCDetection produces them
(xml (x1, y1, x2, y2) -> (x1 - 1, y1 - 1, x2, y2)), so widths are plain x2 - x1 with no "+1". On such boxes
that gives exactly the devkit's IoU on its raw 1-based inclusive boxes, where it adds 1
(w = x2 - x1 + 1): the -1 on the corner already accounts for it. mmdetection gets the same numbers the other
way round: its VOC loader subtracts 1 from all four corners and its VOCMetric calls eval_map with
use_legacy_coordinate=True (+1). Adding +1 on our boxes as well would inflate every box by a pixel.

Matching follows VOCevaldet: per class, detections in descending score order; each takes the ground-truth
box of its class in its image with the highest IoU (difficult ones included); if that IoU >= the threshold
(the MATLAB devkit's `>=`), a difficult box makes it neither TP nor FP, an unmatched box makes it a TP (and
matched), an already matched one makes it a FP; otherwise it is a FP. Difficult boxes do not count in the
number of positives. AP: all-points interpolation (VOC2010+), or the 11-point one with use_07_metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tasks.detection.confusion import DetectionErrors
from tasks.detection.predictions import prediction_arrays, to_numpy

IOU_RANGE = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # COCO's 0.50:0.05:0.95
GroundTruth = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [G,4] xyxy, labels [G], difficult [G] bool


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of xyxy boxes, continuous coordinates (no +1)."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def interpolated_precision(recall: np.ndarray, precision: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The precision envelope (best precision at recall >= r) at each r of `grid`, 0 beyond the last recall:
    COCOeval's interpolation, so VOC and COCO curves read the same."""
    envelope = np.maximum.accumulate(np.asarray(precision, np.float64)[::-1])[::-1]
    index = np.searchsorted(np.asarray(recall, np.float64), grid, side="left")
    return np.where(index < len(envelope), envelope[np.minimum(index, len(envelope) - 1)], 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """VOC AP from a precision/recall curve (detections in descending score order)."""
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            p = precision[recall >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


class VOCEvaluator(DetectionErrors):
    """VOC mAP at one IoU threshold over the images it has seen. `compute()` returns "mAP50" (the mean over
    classes that have non-difficult ground truth in those images) and "AP50/<class>" per class (NaN for a
    class without such ground truth). An image seen twice counts once. With `iou_range=True` it also returns
    "mAP": the same AP averaged over IoU thresholds 0.50, 0.55, ..., 0.95 (COCO's localisation-aware
    summary, here with VOC's matching and all-points AP, for data that comes in VOC layout).

    For the report: `per_class_ap()`, `precision_recall()` and DetectionErrors' confusion matrix and errors
    per image (difficult boxes are ignored there as here)."""

    primary = "mAP50"

    def __init__(
        self,
        ground_truth: Mapping[Any, GroundTruth],
        class_names: Sequence[str],
        iou_threshold: float = 0.5,
        use_07_metric: bool = False,
        iou_range: bool = False,
    ):
        self.class_names = list(class_names)
        self.iou_threshold = float(iou_threshold)
        self.iou_range = bool(iou_range)
        self.use_07_metric = bool(use_07_metric)
        self.ground_truth: dict[Any, GroundTruth] = {}
        for image_id, (boxes, labels, difficult) in ground_truth.items():
            boxes = to_numpy(boxes).astype(np.float64).reshape(-1, 4)
            labels = to_numpy(labels).astype(np.int64).reshape(-1)
            difficult = to_numpy(difficult).astype(bool).reshape(-1)
            if not len(boxes) == len(labels) == len(difficult):
                raise ValueError(
                    f"ground truth of image {image_id!r} has {len(boxes)} boxes, {len(labels)} labels and "
                    f"{len(difficult)} difficult flags; expected equal counts."
                )
            self.ground_truth[image_id] = (boxes, labels, difficult)
        self.reset()

    def reset(self) -> None:
        self._detections: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _key(image_id: Any) -> Any:
        image_id = to_numpy(image_id) if hasattr(image_id, "detach") else image_id
        if isinstance(image_id, np.ndarray):
            image_id = image_id.item()
        return int(image_id) if isinstance(image_id, (int, np.integer)) else image_id

    def update(self, targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]) -> None:
        if len(targets) != len(predictions):
            raise ValueError(
                f"got {len(targets)} targets but {len(predictions)} predictions; expected one per image."
            )
        for target, pred in zip(targets, predictions, strict=True):
            image_id = self._key(target["image_id"])
            if image_id not in self.ground_truth:
                raise ValueError(f"image_id {image_id!r} has no ground truth in this evaluator.")
            if image_id in self._detections:
                continue
            boxes, scores, labels = prediction_arrays(pred, image_id)
            self._detections[image_id] = (boxes, scores, labels)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {"mAP50": 0.0}
        if not self._detections:
            print("VOCEvaluator: no images were evaluated; returning zeros.")
            return out | {f"AP50/{name}": 0.0 for name in self.class_names}
        aps = [self._class_ap(c) for c in range(len(self.class_names))]
        valid = [ap for ap in aps if not math.isnan(ap)]
        if not valid:
            print("VOCEvaluator: the evaluated images hold no non-difficult ground truth; mAP50 is 0.")
        out["mAP50"] = float(np.mean(valid)) if valid else 0.0
        if self.iou_range:
            per_threshold = [[self._class_ap(c, t) for c in range(len(self.class_names))] for t in IOU_RANGE]
            means = [float(np.mean([ap for ap in aps if not math.isnan(ap)] or [0.0])) for aps in per_threshold]
            out["mAP"] = float(np.mean(means))
        out |= {f"AP50/{name}": ap for name, ap in zip(self.class_names, aps, strict=True)}
        return out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_ids(self) -> list:
        return list(self._detections)

    def ground_truth_of(self, image_id: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.ground_truth[self._key(image_id)]

    def detections_of(self, image_id: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._detections[self._key(image_id)]

    def per_class_ap(self) -> dict[str, dict[str, float]]:
        """name -> {"AP50": AP at this evaluator's IoU threshold}; NaN for a class without ground truth."""
        return {name: {"AP50": self._class_ap(c) if self._detections else 0.0}
                for c, name in enumerate(self.class_names)}

    def precision_recall(self, grid: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(recall grid, default COCO's 101 points; name -> interpolated precision there); NaN for a class
        without ground truth."""
        grid = np.linspace(0.0, 1.0, 101) if grid is None else np.asarray(grid, np.float64)
        curves = {}
        for c, name in enumerate(self.class_names):
            pr = self._class_pr(c)
            if pr is None:
                curves[name] = np.full_like(grid, np.nan)
            else:
                curves[name] = interpolated_precision(*pr, grid) if len(pr[0]) else np.zeros_like(grid)
        return grid, curves

    def _class_ap(self, cls: int, iou_threshold: float | None = None) -> float:
        pr = self._class_pr(cls, iou_threshold)
        return math.nan if pr is None else average_precision(*pr, self.use_07_metric)

    def _class_pr(self, cls: int, iou_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(recall, precision) per detection of class `cls` in descending score order; None without positives."""
        threshold = self.iou_threshold if iou_threshold is None else float(iou_threshold)
        gt: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        npos = 0
        det_img, det_score, det_box = [], [], []
        for image_id, (boxes, scores, labels) in self._detections.items():
            g_boxes, g_labels, g_difficult = self.ground_truth[image_id]
            m = g_labels == cls
            gt[image_id] = (g_boxes[m], g_difficult[m], np.zeros(int(m.sum()), bool))
            npos += int((~g_difficult[m]).sum())
            k = labels == cls
            det_img.extend([image_id] * int(k.sum()))
            det_score.append(scores[k])
            det_box.append(boxes[k])
        if npos == 0:
            return None
        scores = np.concatenate(det_score) if det_score else np.zeros(0)
        boxes = np.concatenate(det_box) if det_box else np.zeros((0, 4))
        order = np.argsort(-scores, kind="stable")
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for d, j in enumerate(order):
            g_boxes, g_difficult, matched = gt[det_img[j]]
            if len(g_boxes) == 0:
                fp[d] = 1
                continue
            ious = box_iou(boxes[j : j + 1], g_boxes)[0]
            best = int(np.argmax(ious))
            if ious[best] >= threshold:
                if g_difficult[best]:
                    continue
                if not matched[best]:
                    tp[d] = 1
                    matched[best] = True
                else:
                    fp[d] = 1
            else:
                fp[d] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return recall, precision

    def state(self) -> dict[str, Any]:
        return {"detections": {k: tuple(v) for k, v in self._detections.items()}}

    state_dict = state

    def merge(self, states: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Add other processes' `state()`s (one or a list); images already held are not counted again."""
        if isinstance(states, Mapping):
            states = [states]
        for st in states:
            for image_id, dets in st["detections"].items():
                self._detections.setdefault(self._key(image_id), tuple(np.asarray(d) for d in dets))
