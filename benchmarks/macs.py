"""Multiply-adds of one forward pass, counted by PyTorch's FlopCounterMode (convolutions and matmuls)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def giga_macs(forward: Callable[[torch.Tensor], object], input_size: int) -> float:
    """GMACs of `forward` on one [1, 3, S, S] image (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        forward(torch.zeros(1, 3, input_size, input_size))
    return counter.get_total_flops() / 2e9


def ours_detection_gmacs(num_classes: int, input_size: int = 320) -> float:
    """Our SSDLite-MobileNetV2 as experiment=ssdlite_finetune builds it, network only (no decoding)."""
    from hydra import compose, initialize_config_dir

    from tasks.cli import CONFIG_DIR
    from tasks.training.model import build_model

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ssdlite_finetune", "backbone.pretrained=null"])
    model = build_model(cfg.backbone, cfg.head, num_classes).eval()
    return giga_macs(model, input_size)


def torchvision_ssdlite_gmacs(num_classes: int, input_size: int = 320) -> float:
    """torchvision's ssdlite320_mobilenet_v3_large (backbone + head, no transform or decoding)."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1).eval()
    return giga_macs(lambda x: model.head(list(model.backbone(x).values())), input_size)
