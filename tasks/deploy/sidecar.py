"""What a deployment needs to know besides the graph: the sidecar JSON written beside every export
(task, input size, mean/std, class names, COCO category ids, decoding settings)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tasks.errors import ConfigError
from tasks.resolve import instantiate_node

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "mobilevision-onnx"
SIDECAR_VERSION = 1
INPUT_NAME = "images"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def task_of(cfg: DictConfig) -> str:
    task = (cfg.get("head") or {}).get("task") or cfg.dataset.get("task")
    if task not in ("detection", "segmentation"):
        raise ConfigError(f"head.task={task!r} in the checkpoint's config is not exportable; expected "
                          f"'detection' or 'segmentation'.")
    return str(task)



_KNOWN_CLASS_NAMES = {
    "tasks.segmentation.voc.VOCSegmentation": "tasks.segmentation.palette:VOC_CLASSES",
    "tasks.detection.voc.VOCDetection": "tasks.detection.voc:VOC_CLASSES",
}


def dataset_labels(cfg: DictConfig) -> tuple[list[str], list[int] | None]:
    """(class names, label -> COCO category id or None) of the checkpoint's dataset.

    Read from the val dataset itself (for COCO the annotation json, whose category ids are not
    contiguous); where its files are absent, from the config, the loader's defaults, or `class_<i>`.
    """
    num_classes = int(cfg.dataset.num_classes)
    try:
        dataset = instantiate_node(cfg.dataset.val)
        names = [str(n) for n in dataset.class_names]
        cat_ids = getattr(dataset, "label_to_cat_id", None)
        return names, ([int(c) for c in cat_ids] if cat_ids is not None else None)
    except (FileNotFoundError, ValueError, OSError, KeyError) as err:
        log.warning("cannot read the dataset's class names (%s); using the config's or generic ones", err)
    names = cfg.dataset.get("class_names") or cfg.dataset.val.get("class_names")
    target = str(cfg.dataset.val.get("_target_", ""))
    if not names and target in _KNOWN_CLASS_NAMES:
        module, attr = _KNOWN_CLASS_NAMES[target].split(":")
        names = getattr(__import__(module, fromlist=[attr]), attr)
    if not names or len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    return [str(n) for n in names], None


def model_metadata(cfg: DictConfig) -> dict[str, Any]:
    """The sidecar's description of the model, without export details."""
    task = task_of(cfg)
    size = int(cfg.dataset.input_size)
    val_tf = cfg.dataset.val.get("transforms") or {}
    class_names, cat_ids = dataset_labels(cfg)
    meta: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "task": task,
        "input_name": INPUT_NAME,
        "input_size": [size, size],
        "input_layout": "NCHW float32 RGB, (pixel / 255 - mean) / std",
        "mean": [float(v) for v in val_tf.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in val_tf.get("std", IMAGENET_STD)],
        "preprocess": ("resize to input_size x input_size (no letterbox)" if task == "detection" else
                       "shrink the longer side to input_size if larger, pad bottom/right with the mean colour"),
        "num_classes": int(cfg.dataset.num_classes),
        "class_names": class_names,
        "label_to_cat_id": cat_ids,
    }
    head = cfg.head
    if task == "detection":
        meta["postprocess"] = {
            "box_coder_weights": [float(w) for w in head.get("box_coder_weights", (10.0, 10.0, 5.0, 5.0))],
            "score_threshold": float(head.get("score_threshold", 0.01)),
            "nms_iou_threshold": float(head.get("nms_iou_threshold", 0.55)),
            "topk_candidates": int(head.get("topk_candidates", 300)),
            "detections_per_image": int(head.get("detections_per_image", 100)),
            "nms_pre": None if head.get("nms_pre", 1000) is None else int(head.get("nms_pre", 1000)),
        }
    else:
        meta["postprocess"] = {"ignore_index": int(head.get("ignore_index", 255))}
    return meta


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX sidecar {path} does not exist; expected the JSON that tasks.export "
                                f"writes beside {Path(onnx_path).name}.")
    meta = json.loads(path.read_text())
    if meta.get("format") != SIDECAR_FORMAT or "task" not in meta:
        raise ValueError(f"{path} is not a mobilevision ONNX sidecar; expected format={SIDECAR_FORMAT!r} "
                         f"and a 'task' entry.")
    return meta


def write_json(data: Any, path: str | Path) -> Path:
    """Written to a temporary file and renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path

