"""Box-aware detection augmentation (albumentations 2.x): SSD's zoom-out and IoU crop, flip,
photometric distortion, square resize, ImageNet normalisation.

`build_detection_transforms(...)` returns a callable
`(image uint8 HWC RGB, boxes xyxy pixels [N,4], labels [N]) -> (image [3,S,S], boxes normalised xyxy [N',4],
labels int64 [N'])`; boxes that leave the image or become degenerate are dropped with their labels.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

# albumentations otherwise asks the network for a newer version at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
from albumentations.augmentations.crops.transforms import BaseCrop  # noqa: E402

from tasks.detection.device_normalize import DeviceNormalize  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SSD's sampler: None = keep the whole image, otherwise the least IoU some box must have with the crop.
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9)


class ZoomOut(A.DualTransform):
    """SSD's "expand": place the image at a random spot of a canvas up to `max_scale` times larger
    (each side), filled with `fill` (the dataset mean), so that objects become small."""

    def __init__(
        self, max_scale: float = 4.0, fill: Sequence[float] = (123.675, 116.28, 103.53), p: float = 0.5
    ):
        super().__init__(p=p)
        if max_scale < 1.0:
            raise ValueError(f"ZoomOut max_scale must be >= 1, got {max_scale}.")
        self.max_scale = float(max_scale)
        self.fill = tuple(float(v) for v in fill)

    @property
    def targets(self) -> dict[str, Any]:
        return {"image": self.apply, "bboxes": self.apply_to_bboxes}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        canvas_h, canvas_w = int(h * ratio), int(w * ratio)
        top = int(self.py_random.uniform(0, canvas_h - h))
        left = int(self.py_random.uniform(0, canvas_w - w))
        return {"canvas": (canvas_h, canvas_w), "offset": (top, left)}

    def apply(
        self, img: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int], **params: Any
    ) -> np.ndarray:
        h, w = img.shape[:2]
        top, left = offset
        channels = img.shape[2] if img.ndim == 3 else 1
        fill = [float(np.round(v)) if img.dtype == np.uint8 else float(v) for v in self.fill[:channels]]
        # one cv2 call: filling a big canvas with a per-channel colour by numpy broadcasting is ~10x slower
        out = cv2.copyMakeBorder(
            img, top, canvas[0] - h - top, left, canvas[1] - w - left, cv2.BORDER_CONSTANT, value=fill
        )
        return out.reshape(canvas[0], canvas[1], *img.shape[2:])

    def apply_to_bboxes(
        self, bboxes: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int], **params: Any
    ) -> np.ndarray:
        h, w = params["shape"][:2]
        top, left = offset
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * w + left) / canvas[1]
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * h + top) / canvas[0]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_scale", "fill")


class SSDRandomIoUCrop(BaseCrop):
    """SSD's random crop (Liu et al. 2016, sec. 2.2; torchvision's RandomIoUCrop): pick a minimum IoU from
    `min_ious` (None = no crop); try up to `trials` crops with each side scaled by [min_scale, max_scale] and
    aspect (w/h) in `aspect_range`; accept the first one where some box whose centre lies inside the crop
    overlaps it with IoU >= the minimum. Boxes whose centres fall outside the accepted crop are dropped.
    If no crop is found, another minimum IoU is drawn (at most `max_draws` times, then the image is kept).
    """

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        aspect_range: tuple[float, float] = (0.5, 2.0),
        trials: int = 50,
        max_draws: int = 20,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.min_ious = tuple(min_ious)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.aspect_range = (float(aspect_range[0]), float(aspect_range[1]))
        self.trials, self.max_draws = int(trials), int(max_draws)

    @property
    def targets(self) -> dict[str, Any]:
        return {"image": self.apply, "bboxes": self.apply_to_bboxes}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        full = (0, 0, w, h)
        bboxes = data.get("bboxes")
        if bboxes is None or len(bboxes) == 0:
            return {"crop_coords": full}
        boxes = np.asarray(bboxes, dtype=np.float64)[:, :4] * np.array([w, h, w, h])
        for _ in range(self.max_draws):
            min_iou = self.py_random.choice(self.min_ious)
            if min_iou is None:
                return {"crop_coords": full}
            crop = self._search(boxes, w, h, float(min_iou))
            if crop is not None:
                return {"crop_coords": crop}
        return {"crop_coords": full}

    def _search(self, boxes: np.ndarray, w: int, h: int, min_iou: float) -> tuple[int, int, int, int] | None:
        """All `trials` candidates at once; the first valid one wins (same as trying them in turn)."""
        rng = self.random_generator
        scale = rng.uniform(self.min_scale, self.max_scale, size=(self.trials, 2))
        crop_w, crop_h = w * scale[:, 0], h * scale[:, 1]
        aspect = crop_w / crop_h
        shift = rng.uniform(0.0, 1.0, size=(self.trials, 2))
        left = ((w - crop_w) * shift[:, 0]).astype(np.int64)
        top = ((h - crop_h) * shift[:, 1]).astype(np.int64)
        right = (left + crop_w).astype(np.int64)
        bottom = (top + crop_h).astype(np.int64)
        ok = (
            (aspect >= self.aspect_range[0])
            & (aspect <= self.aspect_range[1])
            & (right > left)
            & (bottom > top)
        )

        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (
            (left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None])
        )  # [trials, N]
        ix1 = np.maximum(left[:, None], boxes[:, 0])
        iy1 = np.maximum(top[:, None], boxes[:, 1])
        ix2 = np.minimum(right[:, None], boxes[:, 2])
        iy2 = np.minimum(bottom[:, None], boxes[:, 3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        crop_area = ((right - left) * (bottom - top))[:, None]
        iou = inter / np.maximum(box_area + crop_area - inter, 1e-12)
        ok &= (np.where(inside, iou, -1.0) >= min_iou).any(axis=1)
        hits = np.flatnonzero(ok)
        if hits.size == 0:
            return None
        i = hits[0]
        return int(left[i]), int(top[i]), int(right[i]), int(bottom[i])

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        h, w = params["shape"][:2]
        x1, y1, x2, y2 = crop_coords
        if len(bboxes) and (x1, y1, x2, y2) != (0, 0, w, h):
            cx = (bboxes[:, 0] + bboxes[:, 2]) * (w / 2)
            cy = (bboxes[:, 1] + bboxes[:, 3]) * (h / 2)
            bboxes = bboxes[(x1 < cx) & (cx < x2) & (y1 < cy) & (cy < y2)]
        return super().apply_to_bboxes(bboxes, crop_coords, **params)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "max_scale", "aspect_range", "trials", "max_draws")


def photometric_distortion() -> A.BaseCompose:
    """SSD's photometric distortion with torchvision's RandomPhotometricDistort ranges: brightness, contrast,
    saturation and hue each applied independently with probability 0.5."""
    return A.Sequential(
        [
            A.ColorJitter(brightness=(0.875, 1.125), contrast=0, saturation=0, hue=0, p=0.5),
            A.ColorJitter(brightness=0, contrast=(0.5, 1.5), saturation=0, hue=0, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=0, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=(-0.05, 0.05), p=0.5),
        ],
        p=1.0,
    )


def bbox_params() -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True)


class DetectionTransform:
    """Runs an albumentations pipeline on (image, boxes, labels) and returns model-ready tensors.

    Albumentations keeps its own random state, so forked DataLoader workers would all replay the same
    augmentations; inside a worker the state is reseeded from the worker's torch seed (different per worker
    and per epoch, reproducible under torch.manual_seed). `seed` fixes the state in the main process.
    """

    def __init__(self, compose: A.Compose, size: int, seed: int | None = None,
                 device_normalize: DeviceNormalize | None = None):
        self.compose = compose
        self.size = int(size)
        # set when the pipeline stops before Normalize: images leave as uint8, the device normalises them
        self.device_normalize = device_normalize
        self._worker_seed: int | None = None
        if seed is not None:
            self.reseed(seed)

    def reseed(self, seed: int) -> None:
        # One shared generator: Compose(seed=...) gives every child its own generator with the SAME seed,
        # which correlates their draws (e.g. two p=0.5 transforms firing together).
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def set_random_seed(self, seed: int) -> None:
        """For a worker_init_fn: seeds this worker's stream (and stops the automatic reseed overriding it)."""
        self.reseed(seed)
        info = torch.utils.data.get_worker_info()
        if info is not None:
            self._worker_seed = info.seed

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray | None = None, labels: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.reseed(info.seed % 2**63)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 HxWx3 RGB image, got dtype {image.dtype} and shape {image.shape}."
            )
        boxes = (
            np.zeros((0, 4), np.float32)
            if boxes is None
            else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        )
        labels = (
            np.zeros((0,), np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        )
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels; expected one label per box.")
        out = self.compose(image=self._compose_input(image), bboxes=boxes, labels=labels)
        image_t = self._output_image(out, image)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4) / self.size
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        out_boxes = np.clip(out_boxes, 0.0, 1.0)
        keep = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
        return (
            image_t,
            torch.from_numpy(np.ascontiguousarray(out_boxes[keep])),
            torch.from_numpy(np.ascontiguousarray(out_labels[keep])),
        )

    def _compose_input(self, image: np.ndarray) -> np.ndarray:
        return image

    def _output_image(self, out: dict[str, Any], image: np.ndarray) -> Any:
        # HWC -> CHW in numpy: torch's own permute+copy is far slower on small contended CPUs.
        return torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"DetectionTransform(size={self.size}, compose={self.compose!r})"


def build_detection_transforms(
    size: int,
    train: bool,
    iou_crop: bool = True,
    zoom_out: bool = True,
    photometric: bool = True,
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int | None = None,
    normalize: bool = True,
    device_augment: bool = False,
) -> DetectionTransform:
    """SSD's training augmentation (photometric -> zoom-out p=0.5 -> IoU crop -> flip) or, for evaluation,
    only the resize; both end with a square `size` x `size` resize (no letterbox) and normalisation.
    `normalize=False` leaves the images uint8 for the device to normalise (`transform.device_normalize`).
    `device_augment=True` (training only): the images leave as decoded, with their drawn augmentation
    parameters, for the device to augment and normalise (`transform.device_augment`, device_augment.py)."""
    if int(size) <= 0:
        raise ValueError(f"transform size must be a positive number of pixels, got {size}.")
    if device_augment and not train:
        raise ValueError("device_augment applies to training transforms only (train=true); evaluation "
                         "images are resized and normalised on the CPU.")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    steps: list[Any] = []
    if train:
        if photometric:
            steps.append(photometric_distortion())
        if zoom_out:
            steps.append(ZoomOut(max_scale=4.0, fill=tuple(255.0 * m for m in mean), p=0.5))
        if iou_crop:
            steps.append(SSDRandomIoUCrop())
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.Resize(height=int(size), width=int(size), area_for_downscale="image"))
    if device_augment:  # augment_plan builds on this module's transforms, hence the late import
        from tasks.detection.augment_plan import PlannedDetectionTransform, planned
        from tasks.detection.device_augment import DeviceAugment

        compose = A.Compose([planned(step) for step in steps], bbox_params=bbox_params())
        return PlannedDetectionTransform(compose, int(size), DeviceAugment(int(size), mean, std), seed=seed)
    if normalize:
        steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    compose = A.Compose(steps, bbox_params=bbox_params())
    return DetectionTransform(compose, size=int(size), seed=seed,
                              device_normalize=None if normalize else DeviceNormalize(mean, std))
