"""The uint8 loader path: normalising on the device gives the CPU pipeline's tensors bit for bit."""
import numpy as np
import pytest
import torch

from tasks.detection.coco import CocoDetection
from tasks.detection.device_normalize import DeviceNormalize
from tasks.detection.transforms import IMAGENET_MEAN, IMAGENET_STD, build_detection_transforms
from tasks.training.loaders import PerSampleSeeds, collate


def coco128(shared_data, normalize):
    root = shared_data / "coco128"
    return PerSampleSeeds(CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                                        build_detection_transforms(160, train=True, normalize=normalize)), seed=3)


def test_uint8_loader_then_device_normalize_equals_the_cpu_pipeline(shared_data):
    """All of SSD's augmentations on real photos, the same per-sample seeds on both paths."""
    cpu, uint8 = coco128(shared_data, True), coco128(shared_data, False)
    indices = range(12)
    expected, exp_targets = collate([cpu[i] for i in indices])
    images, targets = collate([uint8[i] for i in indices])
    assert images.dtype == torch.uint8 and expected.dtype == torch.float32
    normalized = uint8.transforms.device_normalize(images.contiguous(memory_format=torch.channels_last))
    assert normalized.dtype == torch.float32 and torch.equal(normalized, expected)
    for a, b in zip(targets, exp_targets, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_table_is_the_normalisation_formula():
    table = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD).table
    by_hand = (np.arange(256)[None, :] / 255.0 - np.array(IMAGENET_MEAN)[:, None]) / np.array(IMAGENET_STD)[:, None]
    np.testing.assert_allclose(table.numpy(), by_hand, rtol=0, atol=2e-6)


def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="uint8 images"):
        DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD)(torch.zeros(1, 3, 4, 4))


@pytest.mark.slow  # two short training runs: ~90 s on 2 busy cores
def test_training_on_uint8_batches_gives_the_same_weights(tmp_path):
    """`dataset.train.transforms.normalize=false`: the engine normalises on the device; one epoch ends
    with the same weights, bit for bit, as the CPU-normalised run."""
    from helpers import compose_train, tiny_shapes_overrides

    from tasks.train import train
    from tasks.training.checkpoint import load_checkpoint

    base = ["experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
            "head.extra_depths=[32,32]", *tiny_shapes_overrides(tmp_path / "shapes", "coco", 8, 4, 64)]
    weights = []
    for normalize in ("true", "false"):
        train(compose_train([*base, f"+dataset.train.transforms.normalize={normalize}"]), tmp_path / normalize)
        weights.append(load_checkpoint(tmp_path / normalize / "last.ckpt")["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
