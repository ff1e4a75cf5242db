"""Running a trained checkpoint or a deployed file on images: the model's own preprocessing, the runtime that
loads it, the forward pass (window by window above the input size) and the decoding to detections / masks.
Shared by `tasks.predict` and the Python API (`mobilevision.load`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from tasks.deploy.onnx_export import export_model
from tasks.deploy.sidecar import model_metadata, read_sidecar, refuse_to_overwrite, sidecar_path
from tasks.errors import ConfigError
from tasks.resolve import check_file_config, instantiate_from_file
from tasks.segmentation.metrics import sliding_window_logits
from tasks.segmentation.transforms import eval_valid_size
from tasks.training.trained import load_trained_model

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnxruntime", "litert", "executorch")


def val_transforms_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The val transforms of the training config; a plain rebuild from the sidecar if it has none."""
    train_config = meta.get("train_config") or {}
    transforms = ((train_config.get("dataset") or {}).get("val") or {}).get("transforms")
    if transforms:
        return dict(transforms)
    size = int(meta["input_size"][0])
    if meta["task"] == "detection":
        return {"_target_": "tasks.detection.transforms.build_detection_transforms", "size": size,
                "train": False, "mean": meta["mean"], "std": meta["std"]}
    return {"_target_": "tasks.segmentation.transforms.build_segmentation_transforms", "crop_size": size,
            "train": False, "mean": meta["mean"], "std": meta["std"]}


class Preprocessor:
    """RGB uint8 image -> (normalised [3, H, W] input, (h, w) of the input region the image fills)."""

    def __init__(self, task: str, transforms_cfg: dict[str, Any], input_size: Sequence[int],
                 source: str = "the model's config", trusted: Sequence[str] = ()):
        self.task = task
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.transform = instantiate_from_file(transforms_cfg, source, trusted)
        # segmentation trained with dataset.base_size > input size: the photo, its longer side resized to
        # base_size, is covered by input-size windows (as evaluation does)
        base_size = getattr(self.transform, "base_size", None) if task == "segmentation" else None
        side = max(self.input_size[0], int(base_size or 0))
        self.canvas = (side, side) if side > self.input_size[0] else self.input_size

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = image.shape[:2]
        if self.task == "detection":
            tensor = self.transform(image)[0]
            valid = self.input_size
        else:
            tensor = self.transform(image, np.zeros((h, w), np.uint8))[0]
            valid_size = getattr(self.transform, "valid_size", None)  # base_size: the longer side resized to it
            valid = valid_size(h, w) if valid_size is not None else eval_valid_size(h, w, self.input_size[0])
        if tuple(tensor.shape[-2:]) != self.canvas:
            raise ValueError(f"the val transforms made a {tuple(tensor.shape[-2:])} input of a {h}x{w} image; "
                             f"the model takes {self.canvas}.")
        return tensor, valid


def load_runtime(checkpoint: str | None, onnx: str | None, runtime: str, out_dir: Path,
                 threads: int | None = None, device: str = "cpu",
                 trusted: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """(model with the PyTorch model's surface, its sidecar-style description). For litert and executorch,
    `onnx` is the deployed file (.tflite / .pte) made by `tasks.export format=...`."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime} is not allowed; expected one of {', '.join(RUNTIMES)}.")
    if runtime == "pytorch":
        if not checkpoint:
            raise ConfigError("runtime=pytorch needs checkpoint=<path to a tasks.train checkpoint>.")
        if onnx:
            log.warning("runtime=pytorch runs %s; onnx=%s is not used (set runtime=onnxruntime)", checkpoint, onnx)
        model, cfg = load_trained_model(checkpoint, trusted=trusted)
        meta = model_metadata(cfg) | {"train_config": OmegaConf.to_container(cfg, resolve=True),
                                      "config_source": f"checkpoint {checkpoint}"}
        return model.to(device), meta
    if runtime != "onnxruntime":
        from tasks.deploy.runner import load_deployed

        if not onnx:
            raise ConfigError(f"runtime={runtime} needs artifact=<file made by tasks.export format=...>.")
        model = load_deployed(onnx, runtime, threads)
        return model, dict(model.metadata) | {"config_source": f"the sidecar of {onnx}"}
    from tasks.deploy.onnx_runtime import OnnxModel

    if not onnx:
        if not checkpoint:
            raise ConfigError("runtime=onnxruntime needs onnx=<model.onnx> or checkpoint=<path> to export.")
        refuse_to_overwrite([out_dir / "model.onnx", out_dir / "model.json"])
        model, cfg = load_trained_model(checkpoint, trusted=trusted)
        onnx = str(export_model(model, cfg, out_dir / "model.onnx", source=str(checkpoint)))
        log.info("exported %s to %s", checkpoint, onnx)
    elif checkpoint:
        log.info("runtime=onnxruntime runs %s; checkpoint=%s is not used", onnx, checkpoint)
    meta = read_sidecar(onnx) | {"config_source": f"ONNX sidecar {sidecar_path(onnx)}"}
    if meta.get("train_config"):  # checked before anything else: the sidecar is someone else's file
        check_file_config(meta["train_config"].get("dataset") or {}, meta["config_source"], trusted, "dataset")
    model = OnnxModel(onnx, threads=threads, metadata=meta)
    return model, meta


def forward(model: Any, images: torch.Tensor, input_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """The model's outputs for a batch; a segmentation input larger than the model's input size (base_size) is
    covered by overlapping input-size windows, whatever runs the model (PyTorch or a deployed file)."""
    window = int(input_size[0])
    if max(images.shape[-2:]) <= window:
        return model(images)

    def logits(tile: torch.Tensor) -> torch.Tensor:
        out = model(tile)
        if "logits" not in out:
            raise ConfigError(f"this model outputs {sorted(out)} but a {tuple(images.shape[-2:])} input (base_size "
                              f"above the {window}-px input) is predicted window by window from 'logits'; export "
                              f"it without the label map in the graph.")
        return out["logits"]

    return {"logits": sliding_window_logits(logits, images, window)}


def decode(model: Any, outputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]], task: str,
           input_size: Sequence[int], valid_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """The head's predict (PyTorch) or the ONNX runner's; segmentation crops the padding away first."""
    predictor = getattr(model, "head", model)  # BackboneWithHead.predict does not pass the crop arguments
    if task == "segmentation":
        return predictor.predict(outputs, image_sizes, input_size=tuple(input_size), valid_sizes=valid_sizes)
    return predictor.predict(outputs, image_sizes)
