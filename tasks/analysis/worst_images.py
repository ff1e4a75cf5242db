"""The few worst images of a segmentation evaluation, kept during the pass at a bounded cost."""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tasks.detection.predictions import to_numpy


def image_miou(truth: np.ndarray, prediction: np.ndarray, ignore_index: int = 255) -> float:
    """Mean IoU over the classes present in this image's truth or prediction (ignored pixels left out);
    NaN when every pixel is ignored."""
    keep = truth != ignore_index
    truth, prediction = truth[keep].astype(np.int64), prediction[keep].astype(np.int64)
    if truth.size == 0:
        return float("nan")
    k = int(max(truth.max(), prediction.max())) + 1
    matrix = np.bincount(truth * k + prediction, minlength=k * k).reshape(k, k)
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    present = union > 0
    return float((np.diag(matrix)[present] / union[present]).mean())


class WorstImages:
    """Wraps a segmentation evaluator: `update/compute/state/merge/primary` go to it unchanged, and the `keep`
    images with the lowest per-image mIoU are remembered with their truth and predicted masks (uint8), so the
    report re-reads only those images afterwards. Anything else is read from the wrapped evaluator."""

    def __init__(self, evaluator: Any, keep: int = 8, ignore_index: int | None = None):
        self.evaluator = evaluator
        self.keep = int(keep)
        self.ignore_index = int(ignore_index if ignore_index is not None else getattr(evaluator, "ignore_index", 255))
        self._heap: list[tuple[float, int, Any, np.ndarray, np.ndarray]] = []  # (-score, order, id, truth, pred)
        self._order = itertools.count()
        self._seen: set = set()

    @property
    def primary(self) -> str:
        return self.evaluator.primary

    def __getattr__(self, name: str) -> Any:
        if name == "evaluator":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.evaluator, name)

    def _push(self, score: float, image_id: Any, truth: np.ndarray, prediction: np.ndarray) -> None:
        if np.isnan(score) or image_id in self._seen:
            return
        self._seen.add(image_id)
        entry = (-score, next(self._order), image_id, truth, prediction)
        if len(self._heap) < self.keep:
            heapq.heappush(self._heap, entry)
        elif entry[0] > self._heap[0][0]:  # lower score than the best of the kept ones
            heapq.heapreplace(self._heap, entry)

    def update(self, targets: Iterable, predictions: Iterable) -> None:
        targets, predictions = list(targets), list(predictions)
        self.evaluator.update(targets, predictions)
        if self.keep <= 0:
            return
        for target, prediction in zip(targets, predictions):
            truth = to_numpy(target["mask"] if isinstance(target, Mapping) else target)
            predicted = to_numpy(prediction["mask"] if isinstance(prediction, Mapping) else prediction)
            image_id = target.get("image_id") if isinstance(target, Mapping) else None
            image_id = image_id.item() if hasattr(image_id, "item") else image_id
            self._push(image_miou(truth, predicted, self.ignore_index), image_id,
                       truth.astype(np.uint8), predicted.astype(np.uint8))

    def worst(self) -> list[tuple[Any, float, np.ndarray, np.ndarray]]:
        """(image_id, mIoU, truth mask, predicted mask), the worst first."""
        return [(image_id, -neg, truth, pred) for neg, _, image_id, truth, pred in sorted(self._heap, reverse=True)]

    def compute(self) -> dict[str, float]:
        return self.evaluator.compute()

    def state(self) -> dict[str, Any]:
        return {"evaluator": self.evaluator.state(), "worst": self.worst()}

    state_dict = state

    def merge(self, states: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        states = [states] if isinstance(states, Mapping) else list(states)
        self.evaluator.merge([s["evaluator"] for s in states])
        for s in states:
            for image_id, score, truth, prediction in s["worst"]:
                self._push(score, image_id, truth, prediction)


__all__ = ["WorstImages", "image_miou"]
