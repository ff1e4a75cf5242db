"""COCO bbox evaluation with pycocotools' COCOeval (the standard 12 numbers) and COCO results json."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.detection.confusion import DetectionErrors
from tasks.detection.predictions import prediction_arrays, to_numpy

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvaluator(DetectionErrors):
    """Collects detections as COCO results (xywh in original pixels, json category ids) and scores them with
    COCOeval over the images it has seen. An image seen twice (e.g. DistributedSampler padding) counts once.

    `compute()` returns STAT_NAMES -> float; like COCOeval, a number is -1 where the evaluated images hold no
    ground truth for it (e.g. APs with no small objects).

    For the report: `per_class_ap()` (AP, AP50, AP75 per category from COCOeval's precision array),
    `precision_recall()` (per-category curves at IoU 0.5), and DetectionErrors' confusion matrix and errors
    per image."""

    primary = "AP"

    def __init__(self, coco_gt: COCO, label_to_cat_id: Sequence[int]):
        self.coco_gt = coco_gt
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []
        self._image_ids: list[int] = []
        self._seen: set[int] = set()
        self._coco_eval: COCOeval | None = None
        self._by_image: tuple[int, dict[int, list[dict]]] | None = None

    @property
    def class_names(self) -> list[str]:
        return [str(self.coco_gt.cats[c]["name"]) for c in self.label_to_cat_id]

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def update(self, targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]) -> None:
        if len(targets) != len(predictions):
            raise ValueError(
                f"got {len(targets)} targets but {len(predictions)} predictions; expected one per image."
            )
        for target, pred in zip(targets, predictions, strict=True):
            image_id = int(to_numpy(target["image_id"]))
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image_id {image_id} is not in the ground-truth COCO json.")
            if image_id in self._seen:
                continue
            self._coco_eval = None
            self._seen.add(image_id)
            self._image_ids.append(image_id)
            self._results.extend(self._to_results(image_id, pred))

    def _to_results(self, image_id: int, pred: Mapping[str, Any]) -> list[dict]:
        boxes, scores, labels = prediction_arrays(pred, image_id)
        bad = labels[(labels < 0) | (labels >= len(self.label_to_cat_id))]
        if len(bad):
            raise ValueError(
                f"image {image_id}: predicted label {int(bad[0])} is outside "
                f"0..{len(self.label_to_cat_id) - 1}."
            )
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        return [
            {
                "image_id": image_id,
                "category_id": self.label_to_cat_id[int(c)],
                "bbox": [float(v) for v in b],
                "score": float(s),
            }
            for b, s, c in zip(xywh, scores, labels, strict=True)
        ]

    def results(self) -> list[dict]:
        return list(self._results)

    def image_ids(self) -> list[int]:
        return list(self._image_ids)

    def write_results(self, path: str | Path) -> Path:
        """Write the COCO results json (atomically: a temp file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._results, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def compute(self) -> dict[str, float]:
        zeros = dict.fromkeys(STAT_NAMES, 0.0)
        if not self._image_ids:
            print("CocoEvaluator: no images were evaluated; returning zeros.")
            return zeros
        if not self._results:
            print(f"CocoEvaluator: no detections on {len(self._image_ids)} images; returning zeros.")
            return zeros
        coco_eval = self._accumulated()
        coco_eval.summarize()
        return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}

    def _accumulated(self) -> COCOeval:
        """COCOeval after evaluate() and accumulate() over the images seen (kept until new images arrive)."""
        if self._coco_eval is None:
            with contextlib.redirect_stdout(io.StringIO()):
                # loadRes writes into the dicts it gets (area, id, segmentation); give it copies.
                coco_dt = self.coco_gt.loadRes([dict(r) for r in self._results])
                coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
                coco_eval.params.imgIds = sorted(self._image_ids)
                coco_eval.params.catIds = sorted(self.label_to_cat_id)  # a class_names subset is scored alone
                coco_eval.evaluate()
                coco_eval.accumulate()
            self._coco_eval = coco_eval
        return self._coco_eval

    def _precision(self) -> np.ndarray | None:
        """COCOeval's precision [T iou, R recall, K class (label order), A area, M maxDets]; -1 = no ground truth.
        None when nothing was detected (COCOeval cannot run on an empty result list)."""
        if not self._image_ids or not self._results:
            return None
        coco_eval = self._accumulated()
        columns = [coco_eval.params.catIds.index(c) for c in self.label_to_cat_id]
        return coco_eval.eval["precision"][:, :, columns]

    def per_class_ap(self) -> dict[str, dict[str, float]]:
        """name -> {"AP" (IoU .50:.95), "AP50", "AP75"}, all areas, 100 detections per image, the way
        COCOeval.summarize averages them (precision cells of -1 left out); NaN for a category without
        ground truth in the images seen, 0 everywhere when nothing was detected."""
        precision = self._precision()
        out = {}
        for k, name in enumerate(self.class_names):
            if precision is None:
                out[name] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
                continue
            cells = precision[:, :, k, 0, -1]
            values = {}
            for key, rows in (("AP", slice(None)), ("AP50", slice(0, 1)), ("AP75", slice(5, 6))):
                valid = cells[rows][cells[rows] > -1]
                values[key] = float(valid.mean()) if valid.size else float("nan")
            out[name] = values
        return out

    def precision_recall(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(COCO's 101 recall thresholds, name -> interpolated precision at each, IoU 0.5, all areas,
        100 detections); NaN for a category without ground truth, zeros when nothing was detected."""
        recall = np.linspace(0.0, 1.0, 101)
        precision = self._precision()
        if precision is None:
            return recall, {name: np.zeros_like(recall) for name in self.class_names}
        curves = {}
        for k, name in enumerate(self.class_names):
            curve = precision[0, :, k, 0, -1].astype(np.float64)
            curves[name] = np.where(curve > -1, curve, np.nan) if (curve > -1).any() else np.full_like(recall, np.nan)
        return recall, curves

    # -- DetectionErrors' view of the images seen -------------------------------------------------------
    def ground_truth_of(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, labels, ignore = [], [], []
        cat_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}
        for ann in self.coco_gt.imgToAnns.get(int(image_id), []):
            if int(ann["category_id"]) not in cat_to_label:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append((x, y, x + w, y + h))
            labels.append(cat_to_label[int(ann["category_id"])])
            ignore.append(bool(ann.get("iscrowd", 0)))
        return (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64),
                np.asarray(ignore, bool))

    def detections_of(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._by_image is None or self._by_image[0] != len(self._results):
            grouped: dict[int, list[dict]] = {}
            for r in self._results:
                grouped.setdefault(int(r["image_id"]), []).append(r)
            self._by_image = (len(self._results), grouped)
        cat_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}
        rows = self._by_image[1].get(int(image_id), [])
        boxes = np.asarray([r["bbox"] for r in rows], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return (boxes, np.asarray([r["score"] for r in rows], np.float64),
                np.asarray([cat_to_label[int(r["category_id"])] for r in rows], np.int64))

    def state(self) -> dict[str, list]:
        return {"results": list(self._results), "image_ids": list(self._image_ids)}

    state_dict = state

    def merge(self, states: Mapping[str, list] | Iterable[Mapping[str, list]]) -> None:
        """Add other processes' `state()`s (one or a list); images already held are not counted again."""
        if isinstance(states, Mapping):
            states = [states]
        self._coco_eval = None
        for st in states:
            new = {int(i) for i in st["image_ids"]} - self._seen
            for image_id in st["image_ids"]:
                if int(image_id) in new and int(image_id) not in self._seen:
                    self._seen.add(int(image_id))
                    self._image_ids.append(int(image_id))
            self._results.extend(dict(r) for r in st["results"] if int(r["image_id"]) in new)
