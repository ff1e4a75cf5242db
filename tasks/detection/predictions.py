"""Detections as the evaluators read them: (boxes, scores, labels) numpy arrays of equal length."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def prediction_arrays(pred: Mapping[str, Any], image_id: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 boxes [N, 4] xyxy, float64 scores [N], int64 labels [N]; unequal counts are one sentence."""
    boxes = to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
    labels = to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id!r}: prediction has {len(boxes)} boxes, {len(scores)} scores and "
                         f"{len(labels)} labels; expected equal counts.")
    return boxes, scores, labels
