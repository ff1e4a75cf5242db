"""What a deployment needs to know besides the graph: the sidecar JSON written beside every export
(task, input size, mean/std, class names, COCO category ids, decoding settings)."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.errors import ConfigError
from tasks.training.artifact import artifact_without_dataset, task_of_config

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "mobilevision-onnx"
SIDECAR_VERSION = 1
INPUT_NAME = "images"


def task_of(cfg: DictConfig) -> str:
    return task_of_config(cfg)


def model_metadata(cfg: DictConfig) -> dict[str, Any]:
    """The sidecar's description of the model, without export details: read from the checkpoint's
    artifact (`cfg.artifact`, set by tasks.training.trained.load_trained_model), never from the dataset."""
    artifact = cfg.get("artifact")
    artifact = (OmegaConf.to_container(artifact, resolve=True) if isinstance(artifact, DictConfig)
                else artifact) or artifact_without_dataset(cfg, "the checkpoint")
    task = artifact["task"]
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "task": task,
        "input_name": INPUT_NAME,
        "input_size": [int(v) for v in artifact["input_size"]],
        "input_layout": "NCHW float32 RGB, (pixel / 255 - mean) / std",
        "mean": [float(v) for v in artifact["mean"]],
        "std": [float(v) for v in artifact["std"]],
        "preprocess": ("resize to input_size x input_size (no letterbox)" if task == "detection" else
                       "shrink the longer side to input_size if larger, pad bottom/right with the mean colour"),
        "num_classes": int(cfg.dataset.num_classes),
        "class_names": [str(n) for n in artifact["class_names"]],
        "label_to_cat_id": artifact["label_to_cat_id"],
        "postprocess": dict(artifact["decoding"]),
        "versions": dict(artifact.get("versions") or {}),
    }


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


def refuse_to_overwrite(paths: Sequence[str | Path], overwrite: bool = False) -> None:
    """An export never replaces a file it did not write (a sidecar named like a COCO annotation file, a
    model from another run) unless the user says so."""
    for path in paths:
        if Path(path).exists() and not overwrite:
            raise ConfigError(f"{path} already exists and this export would replace it; pass overwrite=true to "
                              f"replace it, or choose another output=.")


def write_json(data: Any, path: str | Path) -> Path:
    """Written to a temporary file and renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique per process: two writers never share it
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

