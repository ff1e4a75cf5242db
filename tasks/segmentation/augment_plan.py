"""The CPU half of segmentation's device augmentation (tasks/segmentation/device_augment.py): draw, do not paint.

As for detection (tasks/detection/augment_plan.py): the training pipeline is built from the CPU path's own
transforms, in the same order, seeded the same way, but each step's image and mask work is replaced by an
empty array of the shape it would have produced. Every random draw (the scale, the crop window, the flip, the
colour jitter's factors and order) is therefore the CPU path's, and the steps' applied parameters say what
the device has to paint. The photo and its mask leave the worker as decoded.
"""
from __future__ import annotations

import inspect
from typing import Any

import albumentations as A
import numpy as np
import torch

from tasks.detection.augment_plan import PlannedColorJitter, PlannedHorizontalFlip
from tasks.detection.device_augment import PlannedImage
from tasks.segmentation.device_augment import PARAMS, SegmentationDeviceAugment
from tasks.segmentation.transforms import SegmentationTransform


def _placeholder(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, dtype=np.uint8)


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """The (h, w) albumentations' RandomScale resizes to (fgeometric.scale: int(side * scale))."""
    return int(shape[0] * scale), int(shape[1] * scale)


class PlannedRandomScale(A.RandomScale):
    def apply(self, img: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        return _placeholder((*scaled_shape(img.shape, scale), *img.shape[2:]))

    def apply_to_mask(self, mask: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        return self.apply(mask, scale)


class PlannedPadIfNeeded(A.PadIfNeeded):
    def apply(self, img: np.ndarray, pad_top: int, pad_bottom: int, pad_left: int, pad_right: int,
              **params: Any) -> np.ndarray:
        return _placeholder((img.shape[0] + pad_top + pad_bottom, img.shape[1] + pad_left + pad_right,
                             *img.shape[2:]))

    def apply_to_mask(self, mask: np.ndarray, pad_top: int, pad_bottom: int, pad_left: int, pad_right: int,
                      **params: Any) -> np.ndarray:
        return self.apply(mask, pad_top, pad_bottom, pad_left, pad_right)


class PlannedRandomCrop(A.RandomCrop):
    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x1, y1, x2, y2 = crop_coords
        return _placeholder((y2 - y1, x2 - x1, *img.shape[2:]))


PLANNED = {A.RandomScale: PlannedRandomScale, A.PadIfNeeded: PlannedPadIfNeeded, A.RandomCrop: PlannedRandomCrop,
           A.HorizontalFlip: PlannedHorizontalFlip, A.ColorJitter: PlannedColorJitter}


def planned(step: Any) -> Any:
    """The shape-only twin of a segmentation training step (same parameter code, same init arguments)."""
    twin = PLANNED.get(type(step))
    if twin is None:
        raise ValueError(f"segmentation device augmentation cannot paint {type(step).__name__}; expected one of "
                         f"{sorted(cls.__name__ for cls in PLANNED)}.")
    # only what __init__ takes: PadIfNeeded reports its parent's `padding` too, which its __init__ refuses
    accepted = inspect.signature(type(step).__init__).parameters
    return twin(**{k: v for k, v in step.get_transform_init_args().items() if k in accepted})


def record_params(steps: list[Any], base: tuple[int, int]) -> torch.Tensor:
    """The parameter record (device_augment.PARAMS) of the last call, read from the steps' applied params;
    `base`: the (h, w) the pipeline started from."""
    record: dict[str, float] = {"base_h": base[0], "base_w": base[1], "scaled_h": base[0], "scaled_w": base[1],
                                "pad_top": 0, "pad_left": 0, "x1": 0, "y1": 0, "flip": 0,
                                "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0,
                                "order0": 0, "order1": 1, "order2": 2, "order3": 3}
    for step in steps:
        applied = step.params  # empty when the step did not fire
        if not applied:
            continue
        if isinstance(step, A.RandomScale):
            record["scaled_h"], record["scaled_w"] = scaled_shape(base, applied["scale"])
        elif isinstance(step, A.PadIfNeeded):
            record["pad_top"], record["pad_left"] = applied["pad_top"], applied["pad_left"]
        elif isinstance(step, A.RandomCrop):
            record["x1"], record["y1"] = applied["crop_coords"][:2]
        elif isinstance(step, A.HorizontalFlip):
            record["flip"] = 1
        elif isinstance(step, A.ColorJitter):
            record.update({name: applied[name] for name in ("brightness", "contrast", "saturation", "hue")})
            record.update({f"order{i}": jitter for i, jitter in enumerate(applied["order"])})
    return torch.tensor([float(record[name]) for name in PARAMS], dtype=torch.float64)


class PlannedSegmentationTransform(SegmentationTransform):
    """SegmentationTransform whose image comes out as a PlannedImage (the decoded photo, its mask and its
    parameter record) and whose mask is None until `device_augment.paint` fills it in on the device."""

    def __init__(self, crop_size: int, pipeline: A.Compose, seed: int | None, base_size: int | None,
                 device_augment: SegmentationDeviceAugment):
        super().__init__(crop_size, True, pipeline, None, seed, base_size)
        self.device_augment = device_augment

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[PlannedImage, None]:
        image, mask = self._checked(image, mask)
        self._reseed_in_worker()
        base = self.valid_size(*image.shape[:2]) if self.base_size is not None else image.shape[:2]
        self.pipeline(image=_placeholder((*base, 3)), mask=_placeholder(base))
        params = record_params(self.pipeline.transforms, base)
        return PlannedImage(torch.from_numpy(np.ascontiguousarray(image)), params,
                            torch.from_numpy(np.ascontiguousarray(mask))), None

    def __repr__(self) -> str:
        return f"PlannedSegmentationTransform(crop_size={self.crop_size}, device_augment={self.device_augment!r})"


__all__ = ["PlannedSegmentationTransform", "planned", "record_params"]
