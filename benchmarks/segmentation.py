"""Mobile DeepLabv3 inference latency against torchvision's MobileNetV3 segmentation models.

Ours: MobileNetV2 at output stride 16 without the 1280 conv ("MNet V2*") + DeepLabV3Head, with the
light head and with full ASPP. Peers: torchvision's lraspp_mobilenet_v3_large (its light head) and
deeplabv3_mobilenet_v3_large (its ASPP model). These are not the same architectures (other backbone,
other heads), so each row carries its MAdds and params: the ratio says which runs faster, the MAdds
say how much work each does. Every model's timed call ends in a [B, H, W] int64 mask: logits
upsampled (bilinear) to the input size, then argmax over classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

from backbones import MobileNetV2
from heads.deeplabv3 import DeepLabV3Head
from tasks.analysis.complexity import count_complexity
from tasks.training.model import BackboneWithHead

from .timing import interleaved, paired_ratio, result_row

OURS_LIGHT = "ours: Mobile DeepLabv3, MNetV2* OS16, light head"
OURS_ASPP = "ours: DeepLabv3, MNetV2* OS16, ASPP"
PEER_LIGHT = "torchvision: lraspp_mobilenet_v3_large"
PEER_ASPP = "torchvision: deeplabv3_mobilenet_v3_large"
PAIRS = ((OURS_LIGHT, PEER_LIGHT), (OURS_ASPP, PEER_ASPP))


@dataclass(frozen=True)
class SegmentationSettings:
    input_size: int = 513
    num_classes: int = 21  # with background (VOC)
    batch: int = 1
    repeats: int = 8
    warmup: int = 1
    seed: int = 0


def build_ours(num_classes: int, aspp: bool) -> BackboneWithHead:
    backbone = MobileNetV2(output_stride=16, last_conv=False, out_features=("C5",))
    return BackboneWithHead(backbone, DeepLabV3Head(backbone.feature_info, num_classes, aspp=aspp))


def build_models(num_classes: int) -> dict[str, nn.Module]:
    return {
        OURS_LIGHT: build_ours(num_classes, aspp=False),
        PEER_LIGHT: lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes),
        OURS_ASPP: build_ours(num_classes, aspp=True),
        PEER_ASPP: deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes),
    }


def segment(model: nn.Module, images: Tensor) -> Tensor:
    """Images -> int64 masks [B, H, W], through each model's own way to full resolution."""
    size = tuple(images.shape[-2:])
    if isinstance(model, BackboneWithHead):
        masks = model.predict(model(images), [size] * images.shape[0])
        return torch.stack([m["mask"] for m in masks])
    return model(images)["out"].argmax(1)  # torchvision upsamples to the input size in forward


def run(settings: SegmentationSettings, log=print) -> dict:
    s = settings
    torch.manual_seed(s.seed)
    models = {name: model.eval() for name, model in build_models(s.num_classes).items()}
    generator = torch.Generator().manual_seed(s.seed)
    images = torch.randn(s.batch, 3, s.input_size, s.input_size, generator=generator)
    complexity = {name: count_complexity(model, images[:1]) for name, model in models.items()}
    with torch.no_grad():
        shapes = {name: list(segment(model, images).shape) for name, model in models.items()}
    expected = [s.batch, s.input_size, s.input_size]
    if any(shape != expected for shape in shapes.values()):
        raise RuntimeError(f"segmentation outputs should all be {expected}, got {shapes}.")
    for name, c in complexity.items():
        log(f"segmentation: {name}: params {c.params / 1e6:.2f} M, MAdds {c.madds / 1e9:.2f} B")

    def timed(model: nn.Module):
        @torch.no_grad()
        def call():
            return segment(model, images)
        return call

    samples = interleaved({name: timed(model) for name, model in models.items()}, s.repeats, s.warmup)
    measure = f"inference + upsample + argmax, batch {s.batch}, {s.input_size}x{s.input_size}"
    rows, comparisons = [], []
    for ours, peer in PAIRS:
        ratio = paired_ratio(samples[ours], samples[peer]).as_dict()
        rows.append(result_row("segmentation", ours, "ours", measure, complexity[ours], samples[ours]))
        rows[-1]["ratio"] = ratio
        rows.append(result_row("segmentation", peer, "peer", measure, complexity[peer], samples[peer]))
        comparisons.append({"task": "segmentation", "measure": measure, "ours": ours, "peer": peer,
                            "ratio": ratio})
    return {"settings": asdict(s), "checks": {"mask_shapes": shapes}, "rows": rows, "comparisons": comparisons}
