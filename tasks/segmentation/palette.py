"""PASCAL VOC's colour palette and class names, label-map PNGs, colourised masks and overlays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC devkit's `labelcolormap`: the bits of each index spread over R, G, B, high bit first.

    Index 255 (ignore) comes out as (224, 224, 192), the cream of VOC's object boundaries.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()


def _as_numpy(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a label map must be 2-D [H, W]; got shape {mask.shape}.")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"label map values must be in 0..255 to fit a palette PNG; got "
                         f"{mask.min()}..{mask.max()}.")
    return mask.astype(np.uint8)


def label_to_image(mask, palette: np.ndarray = VOC_PALETTE) -> Image.Image:
    """A "P" (palette) PIL image whose pixel values are the class indices, as VOC stores its masks."""
    labels = np.ascontiguousarray(_as_numpy(mask))
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return image


def save_label_png(mask, path: str | Path, palette: np.ndarray = VOC_PALETTE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    label_to_image(mask, palette).save(path)
    return path


def colorize(mask, palette: np.ndarray = VOC_PALETTE) -> np.ndarray:
    """[H, W] label map -> [H, W, 3] uint8 RGB in the palette's colours."""
    return np.asarray(palette, dtype=np.uint8)[_as_numpy(mask)]


def overlay(image, mask, alpha: float = 0.5, palette: np.ndarray = VOC_PALETTE,
            ignore_index: int = IGNORE_INDEX, skip_background: bool = True) -> np.ndarray:
    """Blend the mask's colours over an RGB uint8 image [H, W, 3]; ignore (and, by default,
    background) pixels keep the image's own colour."""
    image = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = _as_numpy(mask)
    if image.shape[:2] != labels.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay needs an RGB image [H, W, 3] the size of the mask {labels.shape}; "
                         f"got an image of shape {image.shape}.")
    colours = colorize(labels, palette).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    keep = labels == ignore_index
    if skip_background:
        keep |= labels == 0
    blended[keep] = image[keep]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


__all__ = ["VOC_CLASSES", "VOC_PALETTE", "IGNORE_INDEX", "voc_palette", "label_to_image", "save_label_png",
           "colorize", "overlay"]
