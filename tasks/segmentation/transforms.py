"""Mask-aware augmentation for segmentation (albumentations 2.x), DeepLab's recipe.

Train: random scale 0.5-2.0 -> pad to the crop size (image with the mean colour, i.e. 0 once
normalised; mask with ignore) -> random crop -> horizontal flip -> optional photometric -> normalise.
Eval: shrink the longer side to the crop size only when the image is larger, then pad bottom/right to
the crop size, so the image sits at the top-left, unresized, as DeepLab evaluates VOC at 513.
Masks are always resampled nearest-neighbour.

With `base_size` (photos of any size, e.g. the user's own): train and eval first resize the longer side
to base_size, so both see the same scale distribution whatever the photo size; training then applies
the random scale and crop, evaluation pads to max(crop, base) and keeps the ORIGINAL mask, so mIoU is
scored at the photo's own resolution (the prediction is resized back; `valid_size` says from where),
and a base larger than the crop is evaluated by sliding a crop-sized window.
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import time

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import get_worker_info  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_valid_size(height: int, width: int, crop_size: int) -> tuple[int, int]:
    """The top-left region of the eval input that holds an image of (height, width)."""
    scale = min(1.0, crop_size / max(height, width))
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


class SegmentationTransform:
    """`(image HWC uint8 RGB, mask HW uint8) -> (image float32 [3, S, S], mask int64 [S, S])`.

    Inside a DataLoader worker the random state is re-seeded from the worker's torch seed (which
    differs per worker and per epoch), so forked workers never repeat each other's augmentations.
    """

    def __init__(self, crop_size: int, train: bool, pipeline: A.Compose, shrink: A.BasicTransform | None,
                 seed: int | None, base_size: int | None = None):
        self.crop_size = crop_size
        self.base_size = base_size
        self.train = train
        self.pipeline = pipeline
        self.shrink = shrink
        self.seed = seed
        self._seeded_for: tuple[int, int] | None = None
        if seed is not None:
            self._reseed(seed)

    def _reseed_in_worker(self) -> None:
        info = get_worker_info()
        if info is None:
            return
        key = (os.getpid(), info.seed)
        if key != self._seeded_for:
            self._reseed((info.seed + (self.seed or 0)) % 2**32)
            self._seeded_for = key

    def _reseed(self, seed: int) -> None:
        # One shared generator: Compose.set_random_seed gives every child its own generator with the SAME
        # seed, which correlates their draws (e.g. the flip firing whenever the scale is large).
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def set_random_seed(self, seed: int) -> None:
        """Seed the next draws explicitly (per sample or per worker); the automatic reseed then stays off."""
        self._reseed(seed)
        info = get_worker_info()
        if info is not None:
            self._seeded_for = (os.getpid(), info.seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._checked(image, mask)
        self._reseed_in_worker()
        original = mask
        if self.base_size is not None:
            height, width = self.valid_size(*image.shape[:2])
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        elif self.shrink is not None and max(image.shape[:2]) > self.crop_size:
            out = self.shrink(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        out = self.pipeline(image=image, mask=mask)
        tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        if self.keeps_original_mask:
            out["mask"] = original
        return tensor, torch.from_numpy(np.ascontiguousarray(out["mask"])).to(torch.int64)

    @staticmethod
    def _checked(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (image, mask) pair as arrays, checked; masks of another integer type as uint8."""
        image, mask = np.asarray(image), np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"segmentation transforms expect an RGB uint8 image [H, W, 3]; got "
                             f"{image.dtype} {image.shape}.")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask of shape {mask.shape} does not match its image of shape {image.shape[:2]}.")
        if mask.dtype != np.uint8:
            if mask.size and (mask.min() < 0 or mask.max() > 255):
                raise ValueError(f"mask values must be in 0..255; got {mask.min()}..{mask.max()}.")
            mask = mask.astype(np.uint8)
        return image, mask

    @property
    def keeps_original_mask(self) -> bool:
        """Eval with base_size: the mask comes back at the photo's own size, to be scored there."""
        return self.base_size is not None and not self.train

    def valid_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) a (height, width) image has in the input (eval: its top-left region)."""
        if self.base_size is None:
            return eval_valid_size(height, width, self.crop_size)
        scale = self.base_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))


def build_segmentation_transforms(
    crop_size: int,
    train: bool,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: bool = True,
    photometric: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
    seed: int | None = None,
    base_size: int | None = None,
    device_augment: bool = False,
    crop_shape: Sequence[int] | None = None,
) -> SegmentationTransform:
    """DeepLab's training augmentation or the evaluation padding (module docstring). `device_augment=True`
    (training only): the photos and masks leave the workers as decoded, with their drawn augmentation
    parameters, for the device to augment and normalise (`transform.device_augment`, device_augment.py).
    `crop_shape` (training only): the crop as (height, width) instead of crop_size x crop_size, e.g. one that
    follows the photos' aspect so that less of each step is padding (tasks/datasets/custom.py)."""
    if device_augment and not train:
        raise ValueError("device_augment applies to training transforms only (train=true); evaluation "
                         "images are padded and normalised on the CPU.")
    if crop_size < 1:
        raise ValueError(f"crop_size={crop_size} must be a positive number of pixels.")
    if base_size is not None and int(base_size) < 1:
        raise ValueError(f"base_size={base_size} must be a positive number of pixels (or null: native size).")
    low, high = (float(s) for s in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"scale_range={list(scale_range)} must be (low, high) with 0 < low <= high.")
    if crop_shape is not None and not train:
        raise ValueError("crop_shape applies to training transforms only (train=true); evaluation pads to the "
                         "square crop_size and slides it over larger images.")
    crop_h, crop_w = (crop_size, crop_size) if crop_shape is None else (int(c) for c in crop_shape)
    if min(crop_h, crop_w) < 1:
        raise ValueError(f"crop_shape={list(crop_shape)} must be (height, width) in positive pixels.")
    fill = tuple(float(round(m * 255)) for m in mean)  # the mean colour: 0 after normalising
    canvas = (crop_h, crop_w) if train or base_size is None else (max(crop_size, int(base_size)),) * 2
    pad = A.PadIfNeeded(*canvas, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                        fill=fill, fill_mask=ignore_index)
    normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
    if train:
        steps: list[A.BasicTransform] = [
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            pad,
            A.RandomCrop(crop_h, crop_w),
        ]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        if photometric:
            steps.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02, p=0.8))
        shrink = None
    else:
        steps = [pad]
        shrink = A.LongestMaxSize(max_size=crop_size, interpolation=cv2.INTER_LINEAR,
                                  mask_interpolation=cv2.INTER_NEAREST, p=1.0)
    if device_augment:  # augment_plan builds on this module's transforms, hence the late import
        from tasks.segmentation.augment_plan import PlannedSegmentationTransform, planned
        from tasks.segmentation.device_augment import SegmentationDeviceAugment

        compose = A.Compose([planned(step) for step in steps], mask_interpolation=cv2.INTER_NEAREST)
        return PlannedSegmentationTransform(crop_size, compose, seed, None if base_size is None else int(base_size),
                                            SegmentationDeviceAugment((crop_h, crop_w), mean, std, ignore_index))
    steps.append(normalize)
    pipeline = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)
    return SegmentationTransform(crop_size, train, pipeline, shrink, seed,
                                 None if base_size is None else int(base_size))


__all__ = ["build_segmentation_transforms", "SegmentationTransform", "eval_valid_size", "IMAGENET_MEAN",
           "IMAGENET_STD"]
