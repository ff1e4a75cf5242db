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

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.detection.predictions import prediction_arrays, to_numpy

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvaluator:
    """Collects detections as COCO results (xywh in original pixels, json category ids) and scores them with
    COCOeval over the images it has seen. An image seen twice (e.g. DistributedSampler padding) counts once.

    `compute()` returns STAT_NAMES -> float; like COCOeval, a number is -1 where the evaluated images hold no
    ground truth for it (e.g. APs with no small objects)."""

    primary = "AP"

    def __init__(self, coco_gt: COCO, label_to_cat_id: Sequence[int]):
        self.coco_gt = coco_gt
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []
        self._image_ids: list[int] = []
        self._seen: set[int] = set()

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
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            # loadRes writes into the dicts it gets (area, id, segmentation); give it copies.
            coco_dt = self.coco_gt.loadRes([dict(r) for r in self._results])
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(self._image_ids)
            coco_eval.params.catIds = sorted(self.label_to_cat_id)  # a class_names subset is scored alone
            coco_eval.evaluate()
            coco_eval.accumulate()
        coco_eval.summarize()
        return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}

    def state(self) -> dict[str, list]:
        return {"results": list(self._results), "image_ids": list(self._image_ids)}

    state_dict = state

    def merge(self, states: Mapping[str, list] | Iterable[Mapping[str, list]]) -> None:
        """Add other processes' `state()`s (one or a list); images already held are not counted again."""
        if isinstance(states, Mapping):
            states = [states]
        for st in states:
            new = {int(i) for i in st["image_ids"]} - self._seen
            for image_id in st["image_ids"]:
                if int(image_id) in new and int(image_id) not in self._seen:
                    self._seen.add(int(image_id))
                    self._image_ids.append(int(image_id))
            self._results.extend(dict(r) for r in st["results"] if int(r["image_id"]) in new)
