"""SSD's training augmentation painted on the device: "the CPU draws, the device paints".

With `build_detection_transforms(..., device_augment=True)` the loader's workers only decode the photo and
draw every random parameter with the CPU pipeline's own transforms and seeded streams (tasks/detection/
augment_plan.py); the boxes are transformed there, by the same code as on the CPU path. The worker hands
the untouched uint8 photo (any size) and a small parameter record. `DeviceAugment` then applies, in the CPU
pipeline's order, on whatever device the batch is on:

- photometric distortion (device_photometric.py): albumentations' uint8 brightness, contrast, saturation and
  hue, uint8 after each step;
- zoom-out, IoU crop, flip and the square resize in one separable linear map (device_geometry.py): the crop
  window is cut from the virtual zoom-out canvas (never built) and resized with OpenCV's weights;
- the lookup-table normalisation of DeviceNormalize.

The batch is processed as a whole (the photos padded to the largest one): a few dozen device operations per
batch, not per image, so that a GPU is not held up by launching kernels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasks.detection.device_geometry import zoom_crop_flip_resize
from tasks.detection.device_normalize import DeviceNormalize
from tasks.detection.device_photometric import photometric

# One parameter record per image (float64): photometric factors (identity when a jitter did not fire), the
# zoom-out canvas and the image's offset in it, the crop window in canvas pixels, and the flip.
PARAMS = ("brightness", "contrast", "saturation", "hue", "canvas_h", "canvas_w", "top", "left",
          "x1", "y1", "x2", "y2", "flip")


@dataclass
class PlannedImage:
    """What a worker hands over for one image: the decoded photo (uint8 HWC) and its parameter record."""

    pixels: torch.Tensor
    params: torch.Tensor


@dataclass
class PlannedBatch:
    """A batch of PlannedImages: photos of any size, parameters [B, len(PARAMS)] (kept on the CPU)."""

    pixels: list[torch.Tensor]
    params: torch.Tensor

    @classmethod
    def collate(cls, images: Sequence[PlannedImage]) -> PlannedBatch:
        return cls([im.pixels for im in images], torch.stack([im.params for im in images]))

    def pin_memory(self) -> PlannedBatch:  # DataLoader(pin_memory=True) calls this
        return PlannedBatch([p.pin_memory() for p in self.pixels], self.params)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PlannedBatch:
        return PlannedBatch([p.to(device, non_blocking=non_blocking) for p in self.pixels], self.params)

    def __len__(self) -> int:
        return len(self.pixels)


class DeviceAugment:
    """PlannedBatch (on any device) -> float32 normalised [B, 3, size, size] on that device."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = int(size)
        self.normalize = DeviceNormalize(mean, std)
        # ZoomOut's canvas colour on uint8 images: the mean, rounded
        self.fill = torch.tensor([float(round(255.0 * m)) for m in mean], dtype=torch.float32)

    def augment_uint8(self, batch: PlannedBatch) -> torch.Tensor:
        """uint8 [B, 3, size, size]: the augmented images before normalisation."""
        if not isinstance(batch, PlannedBatch) or len(batch) == 0:
            raise ValueError(f"DeviceAugment takes a non-empty PlannedBatch; got {type(batch).__name__}.")
        for pixels in batch.pixels:
            if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3:
                raise ValueError(f"planned images must be uint8 [H, W, 3]; got {pixels.dtype} {tuple(pixels.shape)}.")
        sizes = [(int(p.shape[0]), int(p.shape[1])) for p in batch.pixels]
        device = batch.pixels[0].device
        padded = torch.zeros(len(sizes), max(h for h, _ in sizes), max(w for _, w in sizes), 3, dtype=torch.uint8,
                             device=device)
        for i, pixels in enumerate(batch.pixels):
            padded[i, :pixels.shape[0], :pixels.shape[1]] = pixels
        images = padded.permute(0, 3, 1, 2)
        params = [dict(zip(PARAMS, values, strict=True)) for values in batch.params.tolist()]
        factors = {name: [p[name] for p in params] for name in ("brightness", "contrast", "saturation", "hue")}
        images = photometric(images, factors, [h * w for h, w in sizes])
        return zoom_crop_flip_resize(images, sizes, params, self.size, self.fill).to(torch.uint8)

    def __call__(self, batch: PlannedBatch) -> torch.Tensor:
        return self.normalize(self.augment_uint8(batch))

    def __repr__(self) -> str:
        return f"DeviceAugment(size={self.size}, normalize={self.normalize!r})"


__all__ = ["DeviceAugment", "PARAMS", "PlannedBatch", "PlannedImage"]
