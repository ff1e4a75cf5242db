"""Detections as COCO result entries: what predict writes per image and the Python API's `to_coco()` return."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tasks.inference.inputs import Frame


def coco_results(frame: Frame, result: dict[str, torch.Tensor], class_names: Sequence[str],
                 label_to_cat_id: Sequence[int] | None) -> list[dict[str, Any]]:
    # COCO file names are the image id (000000000139.jpg -> 139); anything else keeps its name.
    image_id: int | str = int(frame.name) if frame.name.isdigit() else frame.name
    entries = []
    for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
        x1, y1, x2, y2 = box
        entries.append({
            "image_id": image_id,
            "file_name": frame.source,
            "category_id": int(label_to_cat_id[label]) if label_to_cat_id else int(label) + 1,
            "label": int(label),
            "category_name": class_names[label] if label < len(class_names) else str(label),
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
            "score": round(float(score), 6),
        })
    return entries
