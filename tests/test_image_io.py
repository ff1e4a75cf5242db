"""The fast JPEG path decodes the same pixels as Pillow, and hands every other file to Pillow."""
import io

import numpy as np
import pytest
from PIL import Image

from tasks.detection.coco import load_rgb
from tasks.errors import DataError
from tasks.images import decode_rgb, jpeg_components


def pillow_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_coco_photos_decode_to_pillows_pixels(shared_data):
    files = sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:24]
    assert files
    for path in files:
        assert jpeg_components(np.fromfile(path, np.uint8)) in (1, 3)  # COCO has greyscale photos too
        assert np.array_equal(decode_rgb(path), pillow_rgb(path)), path.name


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_modes_and_png_match_pillow(tmp_path, mode, progressive):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, len(mode)), dtype=np.uint8).squeeze()
    path = tmp_path / "img.jpg"
    Image.fromarray(pixels, mode).save(path, quality=90, progressive=progressive)
    assert jpeg_components(np.fromfile(path, np.uint8)) == len(mode)  # CMYK (4) goes to Pillow
    assert np.array_equal(decode_rgb(path), pillow_rgb(path))
    png = tmp_path / "img.png"
    Image.fromarray(pixels, mode if mode != "CMYK" else "RGBA").save(png)
    assert jpeg_components(np.fromfile(png, np.uint8)) is None
    assert np.array_equal(decode_rgb(png), pillow_rgb(png))


def test_exif_orientation_is_ignored_like_pillow(tmp_path):
    pixels = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": neither path may apply it
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    assert decode_rgb(path).shape == (20, 30, 3)
    assert np.array_equal(decode_rgb(path), pillow_rgb(path))


def test_truncated_jpeg_still_fails_with_one_sentence(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:-200])  # no end marker: Pillow's path, Pillow's error
    assert jpeg_components(np.fromfile(path, np.uint8)) is None
    with pytest.raises(DataError, match="cut.jpg cannot be decoded"):
        load_rgb(path)
