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

from collections.abc import Callable, Sequence
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
    """What a worker hands over for one image: the decoded photo (uint8 HWC) and its parameter record (and,
    for segmentation, its uint8 mask [H, W], painted on the device too)."""

    pixels: torch.Tensor
    params: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass
class PlannedBatch:
    """A batch of PlannedImages: photos of any size, parameters [B, len(PARAMS)] (kept on the CPU), and the
    masks when the images carry them."""

    pixels: list[torch.Tensor]
    params: torch.Tensor
    masks: list[torch.Tensor] | None = None

    @classmethod
    def collate(cls, images: Sequence[PlannedImage]) -> PlannedBatch:
        masks = [im.mask for im in images]
        if any(m is None for m in masks) and any(m is not None for m in masks):
            raise ValueError("collate got planned images with and without masks; expected one kind per batch.")
        return cls([im.pixels for im in images], torch.stack([im.params for im in images]),
                   None if masks[0] is None else masks)

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> PlannedBatch:
        return PlannedBatch([move(p) for p in self.pixels], self.params,
                            None if self.masks is None else [move(m) for m in self.masks])

    def pin_memory(self) -> PlannedBatch:  # DataLoader(pin_memory=True) calls this
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PlannedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return len(self.pixels)


def pad_to_largest(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[H_i, W_i, ...] tensors (one device, one dtype) -> [B, max H, max W, ...], each at the top-left, zeros
    elsewhere."""
    first = tensors[0]
    padded = first.new_zeros(len(tensors), max(t.shape[0] for t in tensors), max(t.shape[1] for t in tensors),
                             *first.shape[2:])
    for i, t in enumerate(tensors):
        padded[i, :t.shape[0], :t.shape[1]] = t
    return padded


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
        images = pad_to_largest(batch.pixels).permute(0, 3, 1, 2)
        params = [dict(zip(PARAMS, values, strict=True)) for values in batch.params.tolist()]
        factors = {name: [p[name] for p in params] for name in ("brightness", "contrast", "saturation", "hue")}
        images = photometric(images, factors, [h * w for h, w in sizes])
        return zoom_crop_flip_resize(images, sizes, params, self.size, self.fill).to(torch.uint8)

    def __call__(self, batch: PlannedBatch) -> torch.Tensor:
        return self.normalize(self.augment_uint8(batch))

    def paint(self, batch: PlannedBatch, targets: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """What the engine calls: the images augmented; detection targets were final on the CPU already."""
        return self(batch), targets

    def __repr__(self) -> str:
        return f"DeviceAugment(size={self.size}, normalize={self.normalize!r})"


__all__ = ["DeviceAugment", "PARAMS", "PlannedBatch", "PlannedImage", "pad_to_largest"]
