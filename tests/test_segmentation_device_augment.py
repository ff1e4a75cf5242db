"""Segmentation's device augmentation ("the CPU draws, the device paints") against the CPU albumentations
pipeline, on the VOC sample photos and their SegmentationClass masks, CPU tensors.

Measured here (17 VOC photos, albumentations 2.0.8, OpenCV 5.0): scale + pad + crop + flip are bit-exact for
the image (OpenCV's INTER_LINEAR fixed point, including its row-axis edge weights) and for the mask (its
INTER_NEAREST index); so is the base_size resize. The colour jitter differs by at most 3 uint8 levels in
~0.05 % of the values: the hue step's 1-level differences (tests/test_device_augment.py) grow through the
brightness, contrast and saturation steps that ColorJitter may run after it.

The tests that paint run on every device of the `device` fixture (tests/conftest.py: the CPU, and CUDA where
there is one) with the same bounds: segmentation's device path is integer arithmetic (OpenCV's fixed point,
nearest-neighbour indices, gathers) and element-wise IEEE float (the colour jitter), which a GPU computes bit
for bit as the CPU does, so on CUDA the painted images must equal the path run on the CPU too.
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tasks.detection.device_augment import PlannedBatch, PlannedImage
from tasks.segmentation.device_augment import PARAMS, SegmentationDeviceAugment
from tasks.segmentation.device_geometry import resize_to, scale_pad_crop_flip
from tasks.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, build_segmentation_transforms
from tasks.segmentation.voc import VOCSegmentation
from tasks.training.loaders import PerSampleSeeds, build_loader, collate

CROP = 513
FILL = np.array([round(255 * m) for m in IMAGENET_MEAN])


@pytest.fixture(scope="module")
def voc_root(shared_data) -> Path:
    return shared_data / "voc_samples" / "VOC2012"


@pytest.fixture(scope="module")
def photos(voc_root) -> list[tuple[np.ndarray, np.ndarray]]:
    dataset = VOCSegmentation(voc_root, "val")
    return [dataset.load(i) for i in range(6)]


def cpu_geometry(image, mask, scaled, corner, flip):
    """The CPU pipeline's RandomScale (cv2.resize), PadIfNeeded (bottom/right: mean colour, 255), RandomCrop and
    HorizontalFlip with these parameters, written out with OpenCV and numpy."""
    (sh, sw), (x1, y1) = scaled, corner
    if (sh, sw) != image.shape[:2]:
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (sw, sh), interpolation=cv2.INTER_NEAREST)
    canvas = np.empty((max(CROP, sh), max(CROP, sw), 3), np.uint8)
    canvas[:] = FILL
    canvas[:sh, :sw] = image
    labels = np.full(canvas.shape[:2], 255, np.uint8)
    labels[:sh, :sw] = mask
    image, mask = canvas[y1:y1 + CROP, x1:x1 + CROP], labels[y1:y1 + CROP, x1:x1 + CROP]
    return (image[:, ::-1], mask[:, ::-1]) if flip else (image, mask)


def test_scale_pad_crop_flip_is_bit_exact(photos, one_thread, device):
    """Up- and downscaling, crops over the padding and inside the photo, flipped or not: image and mask as the
    CPU path's, bit for bit, on every device."""
    rng = np.random.default_rng(0)
    for image, mask in photos:
        h, w = image.shape[:2]
        for draw in range(4):
            scale = rng.uniform(0.5, 2.0)
            scaled = int(h * scale), int(w * scale)
            corner = (int(rng.integers(0, max(CROP, scaled[1]) - CROP + 1)),
                      int(rng.integers(0, max(CROP, scaled[0]) - CROP + 1)))
            flip = draw % 2 == 1
            want_image, want_mask = cpu_geometry(image, mask, scaled, corner, flip)
            record = {"scaled_h": scaled[0], "scaled_w": scaled[1], "pad_top": 0, "pad_left": 0,
                      "x1": corner[0], "y1": corner[1], "flip": int(flip)}
            got_image, got_mask = scale_pad_crop_flip(torch.from_numpy(image).permute(2, 0, 1)[None].to(device),
                                                      torch.from_numpy(mask)[None].to(device), [(h, w)], [record],
                                                      CROP, torch.tensor(FILL), 255)
            assert got_image.device.type == got_mask.device.type == device.type
            assert np.array_equal(got_image[0].permute(1, 2, 0).cpu().numpy(), want_image), (scale, corner, flip)
            assert np.array_equal(got_mask[0].cpu().numpy(), want_mask), (scale, corner, flip)


def test_base_size_resize_is_cv2_resize(photos, device):
    """A batch of photos of different sizes, each to its own target: cv2.resize's pixels, bit for bit, on every
    device."""
    chosen = photos[:3]
    sizes = [im.shape[:2] for im, _ in chosen]
    targets = [(round(h * 0.8), round(w * 0.8)) for h, w in sizes[:2]] + [(sizes[2][0] + 37, sizes[2][1] + 11)]
    images = torch.zeros(3, 3, max(h for h, _ in sizes), max(w for _, w in sizes), dtype=torch.uint8)
    masks = torch.zeros(3, *images.shape[2:], dtype=torch.uint8)
    for i, (image, mask) in enumerate(chosen):
        images[i, :, :image.shape[0], :image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)
        masks[i, :mask.shape[0], :mask.shape[1]] = torch.from_numpy(mask)
    got_images, got_masks = resize_to(images.to(device), masks.to(device), sizes, targets)
    got_images, got_masks = got_images.cpu(), got_masks.cpu()
    for i, ((image, mask), (th, tw)) in enumerate(zip(chosen, targets, strict=True)):
        assert np.array_equal(got_images[i, :, :th, :tw].permute(1, 2, 0).numpy(),
                              cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR))
        assert np.array_equal(got_masks[i, :th, :tw].numpy(), cv2.resize(mask, (tw, th),
                                                                          interpolation=cv2.INTER_NEAREST))


def voc(voc_root: Path, **options) -> PerSampleSeeds:
    return PerSampleSeeds(VOCSegmentation(voc_root, "val", build_segmentation_transforms(CROP, train=True, **options)),
                          seed=5)


@pytest.mark.parametrize("options", [{}, {"base_size": 400}])
def test_whole_pipeline_identical_without_photometric(voc_root, one_thread, options, device):
    """Same per-sample seeds: the same crop and flip drawn as the CPU path's, the normalised images and the masks
    identical (DeepLab's recipe, and the fine-tuning recipe's base_size resize before it), on every device."""
    cpu, planned = voc(voc_root, **options), voc(voc_root, device_augment=True, **options)
    steps = {type(step).__name__: step for step in cpu.transforms.pipeline.transforms}
    indices = range(8)
    drawn = []
    for i in indices:
        cpu[i]
        drawn.append((*steps["RandomCrop"].params["crop_coords"][:2], int(bool(steps["HorizontalFlip"].params))))
    expected, expected_targets = collate([cpu[i] for i in indices])
    batch, targets = collate([planned[i] for i in indices])
    assert isinstance(batch, PlannedBatch) and batch.masks is not None and all(t["mask"] is None for t in targets)
    record = batch.params[:, [PARAMS.index("x1"), PARAMS.index("y1"), PARAMS.index("flip")]]
    assert record.tolist() == [list(map(float, d)) for d in drawn]
    assert 0 < record[:, 2].sum() < len(indices)  # both flip outcomes occur
    images, painted = planned.transforms.device_augment.paint(batch.to(device), targets)
    assert images.device.type == device.type
    assert torch.equal(images.cpu(), expected)
    for got, want in zip(painted, expected_targets, strict=True):
        assert got["mask"].dtype == torch.int64 and got["mask"].device.type == device.type
        assert torch.equal(got["mask"].cpu(), want["mask"])
        assert got["image_id"] == want["image_id"]


def test_whole_pipeline_with_photometric_within_3_levels(voc_root, one_thread, device):
    """ColorJitter (four factors, a random order per image): masks identical, uint8 images within 3 levels in
    at most 0.2 % of the values; on CUDA, identical to the device path run on the CPU."""
    cpu, planned = voc(voc_root, photometric=True), voc(voc_root, photometric=True, device_augment=True)
    cpu.transforms.pipeline = type(cpu.transforms.pipeline)(  # the same steps without Normalize: uint8 out
        list(cpu.transforms.pipeline.transforms)[:-1], mask_interpolation=cv2.INTER_NEAREST)
    indices = range(8)
    expected, expected_targets = collate([cpu[i] for i in indices])
    batch, _targets = collate([planned[i] for i in indices])
    jittered = batch.params[:, PARAMS.index("brightness")] != 1.0
    assert 0 < jittered.sum() < len(indices) or jittered.all()
    augment = planned.transforms.device_augment
    images, masks = augment.augment_uint8(batch.to(device))
    assert images.device.type == masks.device.type == device.type
    images, masks = images.cpu(), masks.cpu()
    assert torch.equal(masks, torch.stack([t["mask"] for t in expected_targets]))
    diff = (images.int() - expected.int()).abs()
    assert diff.max() <= 3 and (diff > 0).float().mean() <= 0.002, (diff.max(), (diff > 0).float().mean())
    if device.type != "cpu":
        assert torch.equal(images, augment.augment_uint8(batch)[0])


def test_loader_hands_planned_batches_with_masks(voc_root):
    """Through build_loader (workers 0): uint8 photos and masks as decoded, one record per image."""
    dataset = voc(voc_root, device_augment=True).dataset
    batch, targets = next(iter(build_loader(dataset, batch_size=4, train=True, num_workers=0, seed=1)))
    assert isinstance(batch, PlannedBatch) and len(batch) == 4 and batch.params.shape == (4, len(PARAMS))
    for pixels, mask, target in zip(batch.pixels, batch.masks, targets, strict=True):
        assert pixels.dtype == mask.dtype == torch.uint8 and tuple(mask.shape) == tuple(pixels.shape[:2])
        assert tuple(target["orig_size"].tolist()) == tuple(mask.shape)


def test_refusals():
    with pytest.raises(ValueError, match="training transforms only"):
        build_segmentation_transforms(CROP, train=False, device_augment=True)
    augment = SegmentationDeviceAugment(CROP, IMAGENET_MEAN, IMAGENET_STD)
    without_masks = PlannedBatch([torch.zeros(4, 4, 3, dtype=torch.uint8)], torch.zeros(1, len(PARAMS)))
    with pytest.raises(ValueError, match="with masks"):
        augment(without_masks)
    with pytest.raises(ValueError, match="with and without masks"):
        PlannedBatch.collate([PlannedImage(torch.zeros(4, 4, 3, dtype=torch.uint8), torch.zeros(len(PARAMS)),
                                           torch.zeros(4, 4, dtype=torch.uint8)),
                              PlannedImage(torch.zeros(4, 4, 3, dtype=torch.uint8), torch.zeros(len(PARAMS)))])


def test_training_with_device_augmentation(tmp_path):
    """`+dataset.train.transforms.device_augment=true` on the shapes demo: the engine paints images and masks on
    the device, the run trains one epoch (8 images at 64 px) and evaluates."""
    from helpers import compose_train, tiny_shapes_overrides
    from hydra.utils import instantiate

    from tasks.segmentation.augment_plan import PlannedSegmentationTransform
    from tasks.train import train
    from tasks.training.checkpoint import load_checkpoint

    cfg = compose_train(["experiment=demo_deeplabv3_shapes", "epochs=1", "eval_every=1", "batch_size=4",
                         "backbone.width_mult=0.25", "threads=1", "+dataset.train.transforms.photometric=true",
                         *tiny_shapes_overrides(tmp_path / "shapes", "voc", 8, 4, 64),
                         "+dataset.train.transforms.device_augment=true"])
    assert isinstance(instantiate(cfg.dataset.train.transforms), PlannedSegmentationTransform)
    train(cfg, tmp_path / "run")
    history = load_checkpoint(tmp_path / "run" / "last.ckpt")["history"]
    assert len(history) == 1 and history[0]["train/images_per_s"] > 0
    assert np.isfinite(history[0]["train/loss"]) and history[0]["train/loss"] > 0
    assert 0.0 <= history[0]["val/mIoU"] <= 1.0
