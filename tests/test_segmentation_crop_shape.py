"""The own-data segmentation recipe's training crop follows the photos' aspect (tasks/datasets/custom.py's
voc_seg_crop_shape): 4:3 photos resized to a 512 longer side train on 384x512 crops, not 512x512 ones of
which a quarter or more would be padding; the CPU and device augmentation paths cut the same crops."""
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate
from PIL import Image

from tasks.datasets.custom import voc_seg_crop_shape
from tasks.segmentation.transforms import build_segmentation_transforms
from tasks.segmentation.voc import VOCSegmentation
from tasks.training.loaders import PerSampleSeeds, collate


def write_photos(root: Path, sizes: list[tuple[int, int]], split: str = "train") -> Path:
    """JPEGs of the given (width, height) and their split list; masks all background."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    names = []
    for i, (width, height) in enumerate(sizes):
        names.append(f"{split}{i:03d}")
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "JPEGImages" / f"{names[-1]}.jpg")
        mask = np.zeros((height, width), np.uint8)
        mask[: height // 2] = 1
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{names[-1]}.png")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


@pytest.mark.parametrize("sizes,crop_size,expected", [
    ([(480, 360)] * 3, 512, [384, 512]),                      # 4:3 landscape (the street-scene sets)
    ([(360, 480)] * 3, 512, [512, 384]),                      # portrait
    ([(640, 480), (640, 480), (480, 640)], 512, [384, 512]),  # mostly landscape: the majority sets it
    ([(500, 500), (640, 640)], 512, [512, 512]),              # square photos, square crops
    ([(1920, 1080)] * 2, 320, [192, 320]),                    # 16:9 at 320: 180 rounded up to 16's multiple
    ([(2000, 500)] * 2, 512, [256, 512]),                     # panoramas: never thinner than 1:2
])
def test_crop_follows_the_photos(tmp_path, sizes, crop_size, expected):
    assert voc_seg_crop_shape(str(write_photos(tmp_path, sizes)), "train", crop_size) == expected


def test_crop_is_square_when_the_split_cannot_be_read(tmp_path):
    assert voc_seg_crop_shape(str(tmp_path), "train", 512) == [512, 512]


def test_the_custom_dataset_trains_on_crops_of_that_shape_and_evaluates_on_square_windows(tmp_path):
    root = write_photos(tmp_path, [(480, 360)] * 2)
    write_photos(tmp_path, [(480, 360)], split="val")
    (root / "labels.txt").write_text("background\nsky\n")
    cfg = compose_train(["experiment=deeplabv3_finetune", f"dataset.root={root}", "backbone.pretrained=null"])
    assert list(cfg.dataset.train.transforms.crop_shape) == [384, 512]
    train_set, val_set = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    image, target = train_set[0]
    assert image.shape == (3, 384, 512) and target["mask"].shape == (384, 512)
    image, _ = val_set[0]
    assert image.shape == (3, 512, 512)  # evaluation: base-size photo padded to the square window
    square = compose_train(["experiment=deeplabv3_finetune", f"dataset.root={root}", "dataset.crop_shape=[512,512]"])
    assert instantiate(square.dataset.train)[0][0].shape == (3, 512, 512)


@pytest.mark.parametrize("crop_shape", [(384, 512), (512, 320)])
def test_device_path_cuts_the_cpu_paths_rectangular_crops(shared_data, one_thread, crop_shape, device):
    """Same per-sample seeds, non-square crops: normalised images and masks identical, bit for bit, on every
    device (tests/conftest.py)."""
    root = shared_data / "voc_samples" / "VOC2012"

    def voc(**options) -> PerSampleSeeds:
        transforms = build_segmentation_transforms(512, train=True, base_size=512, crop_shape=crop_shape, **options)
        return PerSampleSeeds(VOCSegmentation(root, "val", transforms), seed=7)

    cpu, planned = voc(), voc(device_augment=True)
    expected, expected_targets = collate([cpu[i] for i in range(6)])
    batch, targets = collate([planned[i] for i in range(6)])
    images, painted = planned.transforms.device_augment.paint(batch.to(device), targets)
    assert images.device.type == device.type
    assert expected.shape == (6, 3, *crop_shape) and torch.equal(images.cpu(), expected)
    for got, want in zip(painted, expected_targets, strict=True):
        assert torch.equal(got["mask"].cpu(), want["mask"])


def test_crop_shape_is_for_training_only():
    with pytest.raises(ValueError, match="crop_shape applies to training transforms only"):
        build_segmentation_transforms(512, train=False, crop_shape=(384, 512))
