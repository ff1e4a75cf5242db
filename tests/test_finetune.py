"""Fine-tuning: init_from with other classes, lr scaled by the global batch, EMA warm-up, sync_bn=auto,
and the preprocessing (mean/std, activation) that follows the backbone weights."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import compose_train
from torch.optim.swa_utils import AveragedModel

import tasks  # noqa: F401  (registers the ${mv.*} resolvers)
from backbones.weights import IMAGENET_MEAN, IMAGENET_STD
from tasks.errors import ConfigError
from tasks.training.checkpoint import CheckpointError, load_model_weights
from tasks.training.config_checks import preprocessing_mismatch
from tasks.training.ema import warmup_decay, warmup_ema_multi_avg_fn
from tasks.training.model import build_model
from tasks.training.scaling import scaled_lr, use_sync_bn


def _ssdlite(num_classes: int, width: float = 0.25):
    cfg = compose_train([f"backbone.width_mult={width}", "head.extra_depths=[32,32]"])
    torch.manual_seed(num_classes)
    return build_model(cfg.backbone, cfg.head, num_classes)


def test_init_from_another_class_count_reinitialises_only_the_class_predictors():
    coco = _ssdlite(80)
    state = {"model": coco.state_dict(), "config": {"dataset": {"num_classes": 80}}}
    mine = _ssdlite(3)
    fresh = {k: v.clone() for k, v in mine.state_dict().items()}
    reinitialised = load_model_weights(mine, state, "coco.ckpt", 3, reinit_head_mismatches=True)
    shapes = {k for k, v in coco.state_dict().items() if v.shape != fresh[k].shape}
    assert reinitialised and set(reinitialised) == shapes
    assert all(k.startswith("head.") and "cls" in k for k in reinitialised)
    for key, value in mine.state_dict().items():
        expected = fresh[key] if key in reinitialised else coco.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="trained for num_classes=80"):  # still exact by default (evaluate)
        load_model_weights(_ssdlite(3), state, "coco.ckpt", 3)


def test_init_from_another_backbone_width_still_refuses():
    other = {"model": _ssdlite(3, width=0.5).state_dict()}
    with pytest.raises(CheckpointError, match=r"backbone\..* in the checkpoint but"):
        load_model_weights(_ssdlite(3), other, "wide.ckpt", 3, reinit_head_mismatches=True)


def test_lr_scales_linearly_with_the_global_batch():
    assert scaled_lr(0.15, 24, 8, 192) == pytest.approx(0.15)  # torchvision's own setup
    assert scaled_lr(0.15, 24, 1, 192) == pytest.approx(0.01875)
    assert scaled_lr(0.002, 16, 4, 32) == pytest.approx(0.004)
    assert scaled_lr(0.01, 7, 3, None) == 0.01  # no reference batch: as given
    with pytest.raises(ConfigError, match="optim.reference_batch=0"):
        scaled_lr(0.1, 8, 1, 0)


def test_sync_bn_auto_turns_on_for_small_per_process_batches_in_multi_process_runs():
    assert use_sync_bn("auto", 2, 8) and not use_sync_bn("auto", 16, 8) and not use_sync_bn("auto", 2, 1)
    assert use_sync_bn(True, 32, 2) and not use_sync_bn(False, 2, 8)
    assert not use_sync_bn("auto", 2, 8, on_gpu=False)  # SyncBatchNorm is CUDA-only: auto stays off on CPU
    with pytest.raises(ConfigError, match="needs GPUs"):
        use_sync_bn(True, 32, 2, on_gpu=False)
    with pytest.raises(ConfigError, match="sync_bn=maybe"):
        use_sync_bn("maybe", 2, 2)


def test_ema_decay_warms_up_so_a_short_run_saves_the_trained_weights():
    """A weight jumps from 0 to 1 at the first step and stays: with a fixed 0.9998, 450 updates leave
    0.9998**450 = 91% of the initial value in the EMA; the warm-up follows the weights."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = AveragedModel(model, multi_avg_fn=warmup_ema_multi_avg_fn(0.9998), use_buffers=True)
    ema.update_parameters(model)  # t = 0: the copy
    with torch.no_grad():
        model.weight.fill_(1.0)
    expected = 0.0
    for t in range(1, 450):
        ema.update_parameters(model)
        d = min(0.9998, (1 + t) / (10 + t))
        expected = d * expected + (1 - d)
    averaged = float(ema.module.weight.detach())
    assert averaged == pytest.approx(expected, rel=1e-5) and averaged > 0.97 and 0.9998 ** 449 > 0.9
    assert warmup_decay(0.9998, 0) == pytest.approx(0.1) and warmup_decay(0.9998, 10**6) == 0.9998


def test_mean_std_and_activation_follow_the_backbone_weights():
    v1 = compose_train(["backbone=mobilenet_v1", "backbone.pretrained=imagenet"])
    assert v1.backbone.act == "relu6"
    for split in ("train", "val"):
        assert list(v1.dataset[split].transforms.mean) == [0.5] * 3 == list(v1.dataset[split].transforms.std)
    v1_scratch = compose_train(["backbone=mobilenet_v1"])
    assert v1_scratch.backbone.act == "relu" and list(v1_scratch.dataset.val.transforms.mean) == list(IMAGENET_MEAN)
    v2 = compose_train(["experiment=ssdlite_finetune", "dataset.root=/data"])
    assert v2.backbone.pretrained == "imagenet"
    assert list(v2.dataset.val.transforms.std) == list(IMAGENET_STD)
    forced = compose_train(["backbone=mobilenet_v1", "backbone.pretrained=imagenet", "backbone.act=relu"])
    assert forced.backbone.act == "relu"  # the user's choice wins (load_pretrained warns about it)
    assert preprocessing_mismatch(v1) is None


def test_a_forced_normalisation_mismatch_is_one_warning_sentence():
    cfg = compose_train(["backbone=mobilenet_v1", "backbone.pretrained=imagenet",
                         "dataset.train.transforms.mean=[0.485,0.456,0.406]"])
    message = preprocessing_mismatch(cfg)
    assert message.startswith("dataset.train.transforms.mean=[0.485, 0.456, 0.406] differs from the mean "
                              "[0.5, 0.5, 0.5] that backbone.pretrained=imagenet expects")
    assert message.endswith("unless that is intended.") and "\n" not in message


def test_the_weights_normalisation_reaches_the_model_inputs():
    """What the dataset transforms produce is what the weights expect: a mid-grey pixel is 0 under 0.5/0.5."""
    import numpy as np
    from hydra.utils import instantiate

    cfg = compose_train(["backbone=mobilenet_v1", "backbone.pretrained=imagenet", "dataset.input_size=32"])
    transform = instantiate(cfg.dataset.val.transforms)
    image = np.full((32, 32, 3), 255, np.uint8)
    tensor = transform(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))[0]
    assert math.isclose(float(tensor.mean()), (1.0 - 0.5) / 0.5, rel_tol=1e-5)
