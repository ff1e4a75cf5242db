"""DeepLab's training augmentation painted on the device, image and mask: "the CPU draws, the device paints".

With `build_segmentation_transforms(..., train=True, device_augment=True)` the loader's workers only decode the
photo and its mask and draw every random parameter with the CPU pipeline's own transforms and seeded streams
(tasks/segmentation/augment_plan.py). `SegmentationDeviceAugment` then applies, in the CPU pipeline's order,
on whatever device the batch is on:

- the base_size resize when the transforms have one (OpenCV's INTER_LINEAR / INTER_NEAREST, as cv2.resize);
- random scale + pad + random crop + flip as one map per axis (device_geometry.py): OpenCV's INTER_LINEAR
  fixed point for the image, its INTER_NEAREST for the mask (padding: the mean colour, and ignore);
- the colour jitter when `photometric` is on (tasks.detection.device_photometric: albumentations' uint8
  arithmetic, in the order ColorJitter drew for each image);
- DeviceNormalize's table.

The batch is processed as a whole (the photos padded to the largest one): a few dozen device operations per
batch, not per image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tasks.detection.device_augment import PlannedBatch, pad_to_largest
from tasks.detection.device_normalize import DeviceNormalize
from tasks.detection.device_photometric import photometric
from tasks.segmentation.device_geometry import resize_to, scale_pad_crop_flip

# One parameter record per image (float64): the size after the base_size resize (the photo's own without one),
# the size after the random scale, the padding before the crop, the crop window's corner, the flip, and the
# colour jitter's factors (identity when it did not fire) and order (indices into brightness, contrast,
# saturation, hue).
PARAMS = ("base_h", "base_w", "scaled_h", "scaled_w", "pad_top", "pad_left", "x1", "y1", "flip",
          "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3")
JITTERS = ("brightness", "contrast", "saturation", "hue")


class SegmentationDeviceAugment:
    """PlannedBatch with masks (on any device) -> float32 normalised images [B, 3, crop_h, crop_w] and int64 masks
    [B, crop_h, crop_w] (ignore_index off the photo), on that device."""

    def __init__(self, crop_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 ignore_index: int = 255):
        """`crop_size`: the training crop, an int (square) or (height, width)."""
        self.crop_hw = (int(crop_size),) * 2 if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        self.crop_size = max(self.crop_hw)
        self.ignore_index = int(ignore_index)
        self.normalize = DeviceNormalize(mean, std)
        # PadIfNeeded's image fill on uint8 images: the mean colour, rounded (transforms.py)
        self.fill = torch.tensor([float(round(m * 255)) for m in mean], dtype=torch.float32)

    def augment_uint8(self, batch: PlannedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, crop_h, crop_w] before normalisation, and int64 masks [B, crop_h, crop_w]."""
        if not isinstance(batch, PlannedBatch) or len(batch) == 0 or batch.masks is None:
            raise ValueError(f"SegmentationDeviceAugment takes a non-empty PlannedBatch with masks; got "
                             f"{type(batch).__name__}.")
        for pixels, mask in zip(batch.pixels, batch.masks, strict=True):
            if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3:
                raise ValueError(f"planned images must be uint8 [H, W, 3]; got {pixels.dtype} {tuple(pixels.shape)}.")
            if mask.dtype != torch.uint8 or tuple(mask.shape) != tuple(pixels.shape[:2]):
                raise ValueError(f"planned masks must be uint8 [H, W] of their image's size; got {mask.dtype} "
                                 f"{tuple(mask.shape)} for an image of {tuple(pixels.shape[:2])}.")
        sizes = [(int(p.shape[0]), int(p.shape[1])) for p in batch.pixels]
        params = [dict(zip(PARAMS, values, strict=True)) for values in batch.params.tolist()]
        images = pad_to_largest(batch.pixels).permute(0, 3, 1, 2)
        masks = pad_to_largest(batch.masks)
        bases = [(int(p["base_h"]), int(p["base_w"])) for p in params]
        if bases != sizes:
            images, masks = resize_to(images, masks, sizes, bases)
        images, masks = scale_pad_crop_flip(images, masks, bases, params, self.crop_hw, self.fill,
                                            self.ignore_index)
        factors = {name: [p[name] for p in params] for name in JITTERS}
        orders = [[int(p[f"order{i}"]) for i in range(len(JITTERS))] for p in params]
        images = photometric(images, factors, [self.crop_hw[0] * self.crop_hw[1]] * len(params), orders)
        return images, masks.to(torch.int64)

    def __call__(self, batch: PlannedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = self.augment_uint8(batch)
        return self.normalize(images), masks

    def paint(self, batch: PlannedBatch, targets: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """What the engine calls: the images augmented, and each target's mask (None from the workers) filled."""
        images, masks = self(batch)
        return images, [{**target, "mask": mask} for target, mask in zip(targets, masks, strict=True)]

    def __repr__(self) -> str:
        return (f"SegmentationDeviceAugment(crop_size={list(self.crop_hw)}, ignore_index={self.ignore_index}, "
                f"normalize={self.normalize!r})")


__all__ = ["PARAMS", "SegmentationDeviceAugment"]
