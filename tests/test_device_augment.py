"""Device augmentation ("the CPU draws, the device paints") against the CPU albumentations pipeline, on
coco128's photos, CPU tensors.

Measured here (coco128, albumentations 2.0.8, OpenCV 5.0): brightness and contrast are bit-exact; saturation
and hue differ by at most 1 uint8 level (saturation in ~1e-5 of the values, hue in ~1e-4: OpenCV's HSV2RGB
rounds instead of truncating for the pixels its vector loop leaves over at the end of each row); zoom-out,
crop and flip are exact; resizing is within 1 level (INTER_AREA in up to ~1.3 % of the values, INTER_LINEAR in
~0.07 %, INTER_AREA's linear fallback exact); the whole pipeline within 1 level in ~0.1 % of the values
(64 photos at 320 and at 160).

The tests that paint run on every device of the `device` fixture (tests/conftest.py: the CPU, and CUDA where
there is one), always against the CPU albumentations pipeline. The checks stay exact on CUDA wherever the device
path's arithmetic is integer or element-wise IEEE float32/float64 (photometric, zoom-out, crop, flip, the
fixed-point INTER_LINEAR, boxes), which a GPU computes bit for bit as the CPU does; only INTER_AREA's float32
matrix products get CUDA_ROUNDING_SHARE more room (below).
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.pixel import functional as albu

from tasks.detection.coco import CocoDetection
from tasks.detection.device_augment import DeviceAugment, PlannedBatch
from tasks.detection.device_geometry import (
    AREA,
    AREA_LINEAR,
    LINEAR,
    resize_mode,
    resize_weights,
    zoom_crop_flip_resize,
)
from tasks.detection.device_photometric import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from tasks.detection.transforms import IMAGENET_MEAN, IMAGENET_STD, ZoomOut, build_detection_transforms
from tasks.images import load_rgb
from tasks.training.loaders import PerSampleSeeds, build_loader, collate

FILL = tuple(255.0 * m for m in IMAGENET_MEAN)
# INTER_AREA's weighted sums are float32 matrix products (TF32 off): cuBLAS adds the products in another order
# than the CPU's BLAS, so a sum within ~1e-4 of a .5 boundary (a few in 1e4 at values up to 255 with float32's
# 6e-8 relative rounding) rounds to the neighbouring level. On CUDA such images may differ in this many more
# values, by 1 level; the CPU keeps its own bounds exactly.
CUDA_ROUNDING_SHARE = 1e-3


def rounding_slack(device: torch.device) -> float:
    return CUDA_ROUNDING_SHARE if device.type == "cuda" else 0.0


@pytest.fixture(scope="module")
def photos(shared_data) -> list[np.ndarray]:
    paths = sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:4]
    return [load_rgb(p) for p in paths]


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy().astype(np.int64)


@pytest.mark.parametrize(("cpu", "ours", "factors", "max_diff", "max_share"), [
    (albu.adjust_brightness_torchvision, adjust_brightness, (0.875, 0.93, 1.07, 1.125), 0, 0.0),
    (albu.adjust_contrast_torchvision, adjust_contrast, (0.5, 0.8, 1.2, 1.5), 0, 0.0),
    (albu.adjust_saturation_torchvision, adjust_saturation, (0.5, 0.8, 1.2, 1.5), 1, 1e-4),
    (albu.adjust_hue_torchvision, adjust_hue, (-0.05, -0.02, 0.01, 0.05), 1, 1e-3),
])
def test_photometric_ops_match_albumentations(photos, cpu, ours, factors, max_diff, max_share, device):
    """Element-wise integer and IEEE float arithmetic: the same bounds on every device."""
    for image, factor in zip(photos, factors, strict=True):
        expected = cpu(image.copy(), factor).astype(np.int64)
        diff = np.abs(hwc(ours(chw(image)[None].to(device), [factor])[0]) - expected)
        assert diff.max() <= max_diff, (factor, diff.max())
        assert (diff > 0).mean() <= max_share, (factor, (diff > 0).mean())


def cpu_geometry(image: np.ndarray, canvas, offset, crop, flip: bool, size: int) -> np.ndarray:
    """What the CPU pipeline's ZoomOut, IoU crop (a slice), HorizontalFlip and Resize do with these parameters."""
    out = ZoomOut(fill=FILL).apply(image, canvas=canvas, offset=offset)
    x1, y1, x2, y2 = crop
    out = out[y1:y2, x1:x2]
    if flip:
        out = cv2.flip(out, 1)
    if out.shape[:2] != (size, size):
        downscale = size < out.shape[0] or size < out.shape[1]
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA if downscale else cv2.INTER_LINEAR)
    return out.astype(np.int64)


def device_geometry(image: np.ndarray, canvas, offset, crop, flip: bool, size: int,
                    device: torch.device | str = "cpu") -> np.ndarray:
    record = {"top": offset[0], "left": offset[1], "x1": crop[0], "y1": crop[1], "x2": crop[2], "y2": crop[3],
              "flip": int(flip)}
    fill = torch.tensor([float(round(v)) for v in FILL])
    return hwc(zoom_crop_flip_resize(chw(image)[None].to(device), [image.shape[:2]], [record], size, fill)[0])


@pytest.mark.parametrize("flip", [False, True])
def test_zoom_out_crop_and_flip_are_exact(photos, flip, device):
    """Crops of exactly size x size (no resize): canvas fill, paste, crop and flip bit for bit, on every device."""
    image = photos[0]
    h, w = image.shape[:2]
    canvas, offset = (2 * h, 3 * w), (h // 3, w + 7)
    for crop in [(w // 2, h // 4, w // 2 + 200, h // 4 + 200),  # part fill, part photo
                 (w + 7 + 10, h // 3 + 5, w + 7 + 210, h // 3 + 205),  # inside the photo
                 (0, 0, 200, 200)]:  # fill only
        assert np.array_equal(device_geometry(image, canvas, offset, crop, flip, 200, device),
                              cpu_geometry(image, canvas, offset, crop, flip, 200))


@pytest.mark.parametrize(("shape", "mode", "max_share"), [
    ((425, 640), AREA, 0.02), ((200, 150), LINEAR, 0.002), ((400, 200), AREA_LINEAR, 0.0), ((150, 320), LINEAR, 0.0)])
@pytest.mark.parametrize("flip", [False, True])
def test_resize_matches_opencv(photos, shape, mode, max_share, flip, device):
    """Crop windows inside the photo, resized: INTER_AREA in float32 (CUDA: CUDA_ROUNDING_SHARE more), INTER_LINEAR
    in OpenCV's fixed point (exact integers in float32 on every device)."""
    image = photos[1]
    assert resize_mode(*shape, 320) == mode
    crop = (0, 0, shape[1], shape[0])
    diff = np.abs(device_geometry(image, image.shape[:2], (0, 0), crop, flip, 320, device)
                  - cpu_geometry(image, image.shape[:2], (0, 0), crop, flip, 320))
    slack = rounding_slack(device) if mode == AREA else 0.0
    assert diff.max() <= 1 and (diff > 0).mean() <= max_share + slack, (diff.max(), (diff > 0).mean())


def test_resize_weights_rows_sum_to_one(device):
    for mode, n_in in (("area", 1000), ("linear", 100), ("area_linear", 500)):
        weights = resize_weights(n_in, 320, mode, device)
        assert weights.device.type == device.type
        torch.testing.assert_close(weights.sum(1).cpu(), torch.ones(320, dtype=torch.float64))


def test_zoomed_out_crops_resized_from_the_virtual_canvas(photos, device):
    """The canvas is never built: the fill colour's share of each output pixel is added in closed form. (The mean
    bound is loose enough for CUDA's INTER_AREA rounding too: CUDA_ROUNDING_SHARE adds at most 1e-3 to it.)"""
    image = photos[2]
    h, w = image.shape[:2]
    canvas, offset = (3 * h, 3 * w), (h, w // 2)
    for crop, flip in [((0, 0, 3 * w, 3 * h), False), ((w // 3, h // 2, w // 3 + 900, h // 2 + 700), True),
                       ((w // 2 + 5, h + 5, w // 2 + 205, h + 105), True)]:
        diff = np.abs(device_geometry(image, canvas, offset, crop, flip, 320, device)
                      - cpu_geometry(image, canvas, offset, crop, flip, 320))
        assert diff.max() <= 1 and diff.mean() <= 0.2, (crop, diff.max(), diff.mean())


def coco128(shared_data: Path, **options) -> PerSampleSeeds:
    root = shared_data / "coco128"
    return PerSampleSeeds(CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                                        build_detection_transforms(160, train=True, **options)), seed=5)


def test_whole_pipeline_same_boxes_close_images(shared_data, one_thread, device):
    """Same per-sample seeds: the targets are the CPU path's exactly, the images within 1 level; on CUDA also
    within 1 level of the device path run on the CPU, in at most CUDA_ROUNDING_SHARE of the values."""
    cpu, planned = coco128(shared_data, normalize=False), coco128(shared_data, device_augment=True)
    indices = range(12)
    expected, expected_targets = collate([cpu[i] for i in indices])
    batch, targets = collate([planned[i] for i in indices])
    assert isinstance(batch, PlannedBatch) and len(batch) == 12
    assert {tuple(p.shape) for p in batch.pixels} != {(160, 160, 3)}  # the photos, as decoded
    for got, want in zip(targets, expected_targets, strict=True):
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["labels"], want["labels"])
    augment = planned.transforms.device_augment
    on_device = batch.to(device)
    images = augment.augment_uint8(on_device)
    assert images.device.type == device.type
    diff = (images.cpu().int() - expected.int()).abs()
    assert images.shape == expected.shape and diff.max() <= 1, diff.max()
    assert (diff > 0).float().mean() <= 0.005 + rounding_slack(device), (diff > 0).float().mean()
    if device.type != "cpu":
        between = (images.cpu().int() - augment.augment_uint8(batch).int()).abs()
        assert between.max() <= 1 and (between > 0).float().mean() <= CUDA_ROUNDING_SHARE, \
            (between.max(), (between > 0).float().mean())
    normalized = augment(on_device)
    assert normalized.dtype == torch.float32 and normalized.device.type == device.type
    assert torch.equal(normalized.cpu(), cpu.transforms.device_normalize(images.cpu()))


def test_parameter_streams_follow_the_sample_seeds(shared_data):
    """Each sample's draws depend on (seed, epoch, index) only: the same with 0 or 2 workers, new next epoch."""
    dataset = coco128(shared_data, device_augment=True).dataset

    def epoch_params(workers: int, epoch: int) -> torch.Tensor:
        loader = build_loader(dataset, batch_size=4, train=True, num_workers=workers, seed=11)
        loader.dataset.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        return torch.cat([batch.params for (batch, _targets), _ in zip(loader, range(2), strict=False)])

    first = epoch_params(0, 0)
    assert torch.equal(first, epoch_params(0, 0))
    assert torch.equal(first, epoch_params(2, 0))
    assert not torch.equal(first, epoch_params(0, 1))


def test_worker_loader_keeps_the_parents_opencv_threads(shared_data):
    """Workers fork while the parent's OpenCV pool is closed (a live one hung them in cv2.setNumThreads); the
    parent gets its thread count back, and the batches are the in-process loader's."""
    dataset = coco128(shared_data, device_augment=True).dataset
    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        cv2.resize(np.zeros((1000, 1000, 3), np.uint8), (100, 100), interpolation=cv2.INTER_AREA)  # pool running
        batches = [next(iter(build_loader(dataset, 4, train=True, num_workers=w, seed=3)))[0] for w in (1, 0)]
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(threads)
    assert torch.equal(batches[0].params, batches[1].params)
    assert all(torch.equal(a, b) for a, b in zip(batches[0].pixels, batches[1].pixels, strict=True))


def test_refusals():
    with pytest.raises(ValueError, match="training transforms only"):
        build_detection_transforms(160, train=False, device_augment=True)
    with pytest.raises(ValueError, match="PlannedBatch"):
        DeviceAugment(160, IMAGENET_MEAN, IMAGENET_STD)(torch.zeros(1, 3, 160, 160, dtype=torch.uint8))


def test_training_with_device_augmentation(tmp_path):
    """`+dataset.train.transforms.device_augment=true`: the engine augments on the device and the run trains
    (one epoch of 8 images at 64 px, ~5 s)."""
    from helpers import compose_train, tiny_shapes_overrides
    from hydra.utils import instantiate

    from tasks.detection.augment_plan import PlannedDetectionTransform
    from tasks.train import train
    from tasks.training.checkpoint import load_checkpoint

    cfg = compose_train(["experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
                         "head.extra_depths=[32,32]", "threads=1",
                         *tiny_shapes_overrides(tmp_path / "shapes", "coco", 8, 4, 64),
                         "dataset.train.transforms.iou_crop=true", "dataset.train.transforms.zoom_out=true",
                         "+dataset.train.transforms.device_augment=true"])
    assert isinstance(instantiate(cfg.dataset.train.transforms), PlannedDetectionTransform)
    train(cfg, tmp_path / "run")
    history = load_checkpoint(tmp_path / "run" / "last.ckpt")["history"]
    assert len(history) == 1 and history[0]["train/images_per_s"] > 0
    assert np.isfinite(history[0]["train/loss"]) and history[0]["train/loss"] > 0
