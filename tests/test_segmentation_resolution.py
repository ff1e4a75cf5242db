"""Segmentation at the user's resolution (dataset.base_size): train and eval see the same scale whatever
the photo size, inputs larger than the crop are evaluated window by window, and mIoU is scored against
the ORIGINAL-resolution masks."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from heads.deeplabv3 import logits_to_label_maps
from tasks.segmentation.metrics import sliding_window_logits
from tasks.segmentation.palette import VOC_PALETTE
from tasks.segmentation.transforms import build_segmentation_transforms
from tasks.segmentation.voc import VOCSegmentation
from tasks.training.evaluation import evaluate
from tasks.training.loaders import build_loader


def _photo(height: int, width: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    image[100:100 + side, 200:200 + side] = 255
    mask[100:100 + side, 200:200 + side] = 1
    return image, mask


def _bright_pixels(tensor: torch.Tensor) -> int:
    return int((tensor[0] > 1.0).sum())  # white after ImageNet normalisation is > 2; the padding is 0


def test_train_and_eval_see_the_same_scale_whatever_the_photo_size():
    for height, width, side in ((1200, 1600, 400), (360, 480, 120)):  # a phone photo, a street-scene frame
        image, mask = _photo(height, width, side)
        train = build_segmentation_transforms(512, train=True, base_size=512, scale_range=(1.0, 1.0), hflip=False)
        evaluation = build_segmentation_transforms(512, train=False, base_size=512)
        train_image, _ = train(image, mask)
        eval_image, eval_mask = evaluation(image, mask)
        expected = round(side * 512 / width) ** 2  # the square after the longer side becomes 512
        assert abs(_bright_pixels(train_image) - expected) <= 0.05 * expected
        assert abs(_bright_pixels(eval_image) - expected) <= 0.05 * expected
        assert eval_mask.shape == (height, width)  # scored at the photo's own resolution
        assert torch.equal(eval_mask, torch.from_numpy(mask).long())
        assert evaluation.valid_size(height, width) == (round(height * 512 / width), 512)


def test_sliding_window_equals_the_whole_input_for_a_pointwise_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)
    images = torch.randn(2, 3, 300, 520)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window_logits(conv, images, 128), conv(images), atol=1e-5, rtol=0)


class Threshold(nn.Module):
    """Class 1 where the first channel is bright: a model whose perfect answer is known."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        bright = images[:, :1] * 10
        return {"logits": torch.cat([-bright, bright], 1)}

    def predict(self, outputs, image_sizes, **options):
        return logits_to_label_maps(outputs["logits"], image_sizes, **options)


def test_evaluation_scores_every_original_pixel_with_a_sliding_window(tmp_path):
    root = tmp_path / "voc"
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / name).mkdir(parents=True)
    sizes = {"a": (600, 900), "b": (700, 500)}
    for key, (height, width) in sizes.items():
        image, mask = _photo(height, width, 240)
        mask[0, :] = 255  # an ignored row
        Image.fromarray(image).save(root / "JPEGImages" / f"{key}.jpg", quality=100)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(VOC_PALETTE.reshape(-1).tolist())
        png.save(root / "SegmentationClass" / f"{key}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    transforms = build_segmentation_transforms(64, train=False, base_size=192)  # base > crop: 64-px windows
    dataset = VOCSegmentation(root, "val", transforms, class_names=["background", "square"])
    _, target = dataset[0]
    assert target["mask"].shape == sizes["a"] and target["valid_size"].tolist() == [128, 192]
    evaluator = dataset.evaluator()
    metrics = evaluate(Threshold(), build_loader(dataset, 2, False, 0, 0), evaluator, torch.device("cpu"),
                       progress=False)
    scored = sum(h * w - w for h, w in sizes.values())  # every original pixel but the ignored rows
    assert int(evaluator.matrix.sum()) == scored
    assert metrics["mIoU"] > 0.97  # only the resized square's edges can differ


class SeenSizes(Threshold):
    """Threshold that records the input sizes it is given."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.sizes.append(tuple(images.shape[-2:]))
        return super().forward(images)


def test_predict_covers_a_base_size_above_the_input_with_windows_and_answers_at_the_photo_size():
    from mobilevision.predictor import Predictor

    transforms = {"_target_": "tasks.segmentation.transforms.build_segmentation_transforms", "crop_size": 64,
                  "train": False, "base_size": 192}
    meta = {"task": "segmentation", "class_names": ["background", "square"], "input_size": [64, 64],
            "train_config": {"dataset": {"val": {"transforms": transforms}}}}
    model = SeenSizes()
    image, mask = _photo(600, 900, 240)
    result = Predictor(model, meta, "pytorch").predict(image)
    assert set(model.sizes) == {(64, 64)}  # the model only ever sees its own input size
    assert result.mask.shape == mask.shape  # answered at the photo's resolution
    both = np.logical_and(result.mask == 1, mask == 1).sum()
    assert both / np.logical_or(result.mask == 1, mask == 1).sum() > 0.97  # only the resized square's edges differ
