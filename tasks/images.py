"""Reading an image file as 8-bit RGB, the one way training, evaluation and predict all read them.

PIL's `convert("RGB")` clips modes wider than 8 bits: a 16-bit PNG (mode I;16 / I) comes out white
wherever a pixel exceeds 255. Here every mode is scaled to 0..255 instead: 16-bit by 257 (65535 -> 255),
32-bit integers by their type's range (16-bit when every value fits 0..65535, which is what PIL gives
for 16-bit PNGs and TIFFs), floats from 0..1 (or clipped 0..255 when they exceed 1), alpha dropped
(the stored colour is kept), palettes with transparency through RGBA, CMYK through PIL's conversion.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.errors import DataError


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


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB (no EXIF rotation: COCO and VOC annotate the stored pixels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist.")
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # truncated, corrupt, not an image
        raise DataError(f"image file {path} cannot be decoded ({type(err).__name__}: "
                        f"{' '.join(str(err).split())}); expected a readable JPEG or PNG.") from None
