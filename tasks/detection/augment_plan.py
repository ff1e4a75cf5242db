"""The CPU half of device augmentation (tasks/detection/device_augment.py): draw, do not paint.

The training pipeline is built from the same transforms as the CPU path, in the same order and with the same
seeded random streams, but each step's image work is replaced by an empty array of the shape it would have
produced (np.empty touches no memory). Every random draw (which jitters fire and their factors, the zoom-out
canvas and offset, the IoU crop search, the flip) and all the box arithmetic therefore run through the CPU
path's own code: the boxes and labels come out identical, and the steps' recorded parameters say what the
device has to paint.
"""
from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch

from tasks.detection.device_augment import PARAMS, DeviceAugment, PlannedImage
from tasks.detection.transforms import DetectionTransform, SSDRandomIoUCrop, ZoomOut


def _placeholder(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, dtype=np.uint8)


class PlannedColorJitter(A.ColorJitter):
    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img


class PlannedZoomOut(ZoomOut):
    def apply(self, img: np.ndarray, canvas: tuple[int, int], **params: Any) -> np.ndarray:
        return _placeholder((*canvas, *img.shape[2:]))


class PlannedIoUCrop(SSDRandomIoUCrop):
    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x1, y1, x2, y2 = crop_coords
        return _placeholder((y2 - y1, x2 - x1, *img.shape[2:]))


class PlannedHorizontalFlip(A.HorizontalFlip):
    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img


class PlannedResize(A.Resize):
    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return _placeholder((self.height, self.width, *img.shape[2:]))


PLANNED = {A.ColorJitter: PlannedColorJitter, ZoomOut: PlannedZoomOut, SSDRandomIoUCrop: PlannedIoUCrop,
           A.HorizontalFlip: PlannedHorizontalFlip, A.Resize: PlannedResize}


def planned(step: Any) -> Any:
    """The shape-only twin of a pipeline step (same class of parameter code, same init arguments)."""
    if isinstance(step, A.Sequential):
        return A.Sequential([planned(child) for child in step.transforms], p=step.p)
    twin = PLANNED.get(type(step))
    if twin is None:
        raise ValueError(f"device augmentation cannot paint {type(step).__name__}; expected one of "
                         f"{sorted(cls.__name__ for cls in PLANNED)}.")
    return twin(**step.get_transform_init_args())


def _jitter_factor(params: dict[str, Any]) -> tuple[str, float] | None:
    """The one property a fired jitter of photometric_distortion changes, and its factor."""
    changed = [(name, params[name]) for name, identity in
               (("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.0))
               if params[name] != identity]
    if len(changed) > 1:
        raise ValueError(f"device augmentation expects jitters that change one property each; got {changed}.")
    return changed[0] if changed else None


def record_params(steps: list[Any], shape: tuple[int, ...]) -> torch.Tensor:
    """The parameter record (device_augment.PARAMS) of the last call, read from the steps' applied params."""
    height, width = shape[:2]
    record: dict[str, float] = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0,
                                "canvas_h": height, "canvas_w": width, "top": 0, "left": 0,
                                "x1": 0, "y1": 0, "x2": width, "y2": height, "flip": 0}
    for step in steps:
        if isinstance(step, A.Sequential):
            for child in step.transforms:
                jitter = _jitter_factor(child.params) if child.params else None
                if jitter is not None:
                    record[jitter[0]] = jitter[1]
            continue
        applied = step.params  # empty when the step did not fire
        if not applied:
            continue
        if isinstance(step, ZoomOut):
            (record["canvas_h"], record["canvas_w"]), (record["top"], record["left"]) = (
                applied["canvas"], applied["offset"])
            record.update(x1=0, y1=0, x2=record["canvas_w"], y2=record["canvas_h"])
        elif isinstance(step, SSDRandomIoUCrop):
            record["x1"], record["y1"], record["x2"], record["y2"] = applied["crop_coords"]
        elif isinstance(step, A.HorizontalFlip):
            record["flip"] = 1
    return torch.tensor([float(record[name]) for name in PARAMS], dtype=torch.float64)


class PlannedDetectionTransform(DetectionTransform):
    """DetectionTransform whose image comes out as a PlannedImage (the decoded photo and its parameter
    record); boxes and labels as DetectionTransform's. `device_augment` paints the batch."""

    def __init__(self, compose: A.Compose, size: int, device_augment: DeviceAugment, seed: int | None = None):
        super().__init__(compose, size=size, seed=seed)
        self.device_augment = device_augment

    def _compose_input(self, image: np.ndarray) -> np.ndarray:
        return _placeholder(image.shape)

    def _output_image(self, out: dict[str, Any], image: np.ndarray) -> PlannedImage:
        return PlannedImage(torch.from_numpy(image), record_params(self.compose.transforms, image.shape))

    def __repr__(self) -> str:
        return f"PlannedDetectionTransform(size={self.size}, device_augment={self.device_augment!r})"


__all__ = ["PlannedDetectionTransform", "planned", "record_params"]
