"""What a checkpoint says about itself (`state["artifact"]`), so that using it never needs the dataset:
task, class names, label -> dataset category id, input size, mean/std, the head's decoding settings and
the software versions that wrote it."""
from __future__ import annotations

import logging
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.errors import ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The head keys that decide how raw outputs become results; every one present in the head config is kept
# (nms_pre: the pre-NMS cap some heads add), so every runtime decodes the same way.
DECODING_KEYS = {
    "detection": ("box_coder_weights", "score_threshold", "nms_iou_threshold", "topk_candidates",
                  "detections_per_image", "nms_pre"),
    "segmentation": ("ignore_index",),
}
DECODING_DEFAULTS = {"box_coder_weights": [10.0, 10.0, 5.0, 5.0], "score_threshold": 0.01,
                     "nms_iou_threshold": 0.55, "topk_candidates": 300, "detections_per_image": 100,
                     "nms_pre": 1000, "ignore_index": 255}  # nms_pre: SSDLiteHead's default
ARTIFACT_KEYS = ("task", "class_names", "label_to_cat_id", "input_size", "mean", "std", "decoding", "versions")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    import torch

    return {"mobilevision": _version("mobilevision"), "torch": str(torch.__version__),
            "torchvision": _version("torchvision"), "python": platform.python_version()}


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def task_of_config(cfg: Any) -> str:
    cfg = _plain(cfg)
    task = (cfg.get("head") or {}).get("task") or (cfg.get("dataset") or {}).get("task")
    if task not in ("detection", "segmentation"):
        raise ConfigError(f"head.task={task!r} in the checkpoint's config is not usable here; expected "
                          f"'detection' or 'segmentation'.")
    return str(task)


def decoding_settings(head_cfg: Any, task: str) -> dict[str, Any]:
    head = _plain(head_cfg)
    settings = {k: head[k] for k in DECODING_KEYS[task] if k in head}
    for key in DECODING_KEYS[task]:
        if key not in settings and key in DECODING_DEFAULTS:
            settings[key] = DECODING_DEFAULTS[key]
    return settings


def build_artifact(cfg: Any, class_names: list[str], label_to_cat_id: list[int] | None) -> dict[str, Any]:
    """The self-description training writes into every checkpoint (`class_names`/`label_to_cat_id` come
    from the training dataset itself)."""
    plain = _plain(cfg)
    task = task_of_config(plain)
    size = int(plain["dataset"]["input_size"])
    val_tf = (plain["dataset"].get("val") or {}).get("transforms") or {}
    return {
        "task": task,
        "num_classes": int(plain["dataset"]["num_classes"]),
        "class_names": [str(n) for n in class_names],
        "label_to_cat_id": [int(c) for c in label_to_cat_id] if label_to_cat_id is not None else None,
        "input_size": [size, size],
        "mean": [float(v) for v in val_tf.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in val_tf.get("std", IMAGENET_STD)],
        "decoding": decoding_settings(plain.get("head") or {}, task),
        "versions": software_versions(),
    }


def artifact_of_dataset(cfg: Any, dataset: Any) -> dict[str, Any]:
    cat_ids = getattr(dataset, "label_to_cat_id", None)
    return build_artifact(cfg, list(dataset.class_names), list(cat_ids) if cat_ids is not None else None)


def artifact_without_dataset(cfg: Any, source: str) -> dict[str, Any]:
    """For checkpoints written before artifacts existed: what the config alone says (class names it
    lists, else class_<i>; no category ids), with a warning, never by reading the dataset."""
    plain = _plain(cfg)
    dataset = plain.get("dataset") or {}
    num_classes = int(dataset.get("num_classes", 0))
    names = dataset.get("class_names") or (dataset.get("val") or {}).get("class_names")
    if not names or len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    log.warning("%s carries no artifact (it predates them): class names %s and category id = label + 1 are "
                "guesses; retrain or re-save it with a current tasks.train", source, names)
    return build_artifact(plain, names, None)
