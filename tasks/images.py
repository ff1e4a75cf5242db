"""Reading an image file as 8-bit RGB, the one way training, evaluation and predict all read them.

Baseline and progressive JPEGs with 1 or 3 components (greyscale, YCbCr: nearly every photo) go through
OpenCV's decoder, which skips Pillow's extra copy into numpy: about 1.7x faster on COCO images, with
identical pixels (both are libjpeg-turbo; tests/test_image_io.py compares them). Everything else (PNG,
CMYK JPEGs, truncated or odd files) is decoded by Pillow, whose errors name what is wrong. EXIF
orientation is ignored on both paths: COCO and VOC annotate the stored pixels.

PIL's `convert("RGB")` clips modes wider than 8 bits: a 16-bit PNG (mode I;16 / I) comes out white
wherever a pixel exceeds 255. Here every mode is scaled to 0..255 instead: 16-bit by 257 (65535 -> 255),
32-bit integers by their type's range (16-bit when every value fits 0..65535, which is what PIL gives
for 16-bit PNGs and TIFFs), floats from 0..1 (or clipped 0..255 when they exceed 1), alpha dropped
(the stored colour is kept), palettes with transparency through RGBA, CMYK through PIL's conversion.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tasks.errors import DataError

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; C4/C8/CC are other segments


def jpeg_components(data: np.ndarray) -> int | None:
    """The number of colour components of a complete JPEG held in `data`, or None if it is not one
    (no start/end markers, or no frame header before the scan data)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[-2] != 0xFF or data[-1] != 0xD9:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = int(data[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = (int(data[i + 2]) << 8) | int(data[i + 3])
        if marker in _SOF_MARKERS:
            return int(data[i + 9]) if i + 9 < n else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we read here
            return None
        i += 2 + length
    return None


def _scaled(values: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel wide-mode image -> uint8 0..255."""
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F":
        scale = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
    else:  # "I": 32-bit signed, as PIL opens 16-bit PNGs; a wider range than 16 bits is rare but possible
        top = values.max() if values.size else 0
        scale = 65535.0 if top <= 65535 else float(2**31 - 1)
    return np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 HxWx3 RGB, scaled rather than clipped."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _scaled(np.asarray(image), mode)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P" and "transparency" in image.info or mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays


def decode_rgb(path: Path) -> np.ndarray:
    """uint8 HxWx3 RGB. Raises Pillow's errors (OSError, SyntaxError, DecompressionBombError) for files it
    cannot read."""
    data = np.fromfile(path, dtype=np.uint8)
    if jpeg_components(data) in (1, 3):
        image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is not None and image.shape[0] * image.shape[1] <= (Image.MAX_IMAGE_PIXELS or float("inf")):
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    with Image.open(path) as im:
        return to_rgb(im)


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB (no EXIF rotation: COCO and VOC annotate the stored pixels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist.")
    try:
        return decode_rgb(path)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # truncated, corrupt, not an image
        raise DataError(f"image file {path} cannot be decoded ({type(err).__name__}: "
                        f"{' '.join(str(err).split())}); expected a readable JPEG or PNG.") from None
