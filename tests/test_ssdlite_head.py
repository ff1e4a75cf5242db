"""SSDLite head: the papers' size figures, layer-for-layer parity with torchvision, gradients, config."""
import inspect
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection.ssdlite import SSDLiteHead as TVSSDLiteHead
from torchvision.models.detection.ssdlite import _extra_block

from backbones import FeatureInfo, MobileNetV1, MobileNetV2
from heads.ssdlite import SSDLiteHead
from heads.ssdlite.box_coder import cxcywh_to_xyxy
from tasks.analysis.complexity import count_complexity

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "head" / "ssdlite.yaml"


class Detector(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images):
        return self.head(self.backbone(images))


@pytest.mark.parametrize("backbone_cls,params_m,madds_b", [
    (MobileNetV2, 4.34, 0.79),  # MobileNetV2 paper, Table 6 (direct count in DESIGN.md)
    (MobileNetV1, 5.10, 1.31),  # same table, MNet V1 + SSDLite
])
def test_paper_params_and_madds(backbone_cls, params_m, madds_b):
    backbone = backbone_cls(out_features=("C4", "C5"))
    head = SSDLiteHead(backbone.feature_info, num_classes=80)
    result = count_complexity(Detector(backbone, head), torch.zeros(1, 3, 320, 320))
    print(f"\nSSDLite + {backbone_cls.__name__} @320, 80+1 classes: params {result.params / 1e6:.3f} M, "
          f"MAdds {result.madds / 1e9:.3f} B")
    assert result.params / 1e6 == pytest.approx(params_m, rel=0.03)
    assert result.madds / 1e9 == pytest.approx(madds_b, rel=0.03)


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _conv_bn_map(ours: str, theirs: str) -> dict[str, str]:
    names = {f"{ours}.conv.weight": f"{theirs}.0.weight"}
    for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        names[f"{ours}.bn.{p}"] = f"{theirs}.1.{p}"
    return names


def test_predictors_match_torchvision_with_same_weights():
    channels, boxes, sizes, num_classes = [576, 1280, 512, 256, 256, 128], [6] * 6, [20, 10, 5, 3, 2, 1], 5
    names = [f"P{i}" for i in range(6)]
    info = {n: FeatureInfo(c, 16) for n, c in zip(names, channels)}
    ours = SSDLiteHead(info, num_classes, in_features=names, extra_depths=(), reduced_first_map=False)
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
    theirs = TVSSDLiteHead(channels, boxes, num_classes + 1, norm)
    _randomise_bn(theirs)
    mapping = {}
    for i in range(6):
        for our_part, their_part in (("cls_predictors", "classification_head"), ("box_predictors", "regression_head")):
            mapping.update(_conv_bn_map(f"{our_part}.{i}.dw", f"{their_part}.module_list.{i}.0"))
            mapping[f"{our_part}.{i}.proj.weight"] = f"{their_part}.module_list.{i}.1.weight"
            mapping[f"{our_part}.{i}.proj.bias"] = f"{their_part}.module_list.{i}.1.bias"
    their_state = theirs.state_dict()
    assert set(mapping) == set(ours.state_dict()) and set(mapping.values()) == set(their_state)
    ours.load_state_dict({k: their_state[v] for k, v in mapping.items()})

    features = [torch.randn(2, c, s, s) for c, s in zip(channels, sizes)]
    with torch.no_grad():
        expected = theirs.eval()(features)
        got = ours.eval()(dict(zip(names, features)))
    torch.testing.assert_close(got["cls_logits"], expected["cls_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["bbox_regression"], expected["bbox_regression"], atol=1e-5, rtol=1e-5)


def test_extra_layers_match_torchvision_extra_block():
    info = {"C4": FeatureInfo(96, 16), "C5": FeatureInfo(160, 32)}
    ours = SSDLiteHead(info, 3, extra_depths=(64, 32))
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
    theirs = nn.ModuleList([_extra_block(160, 64, norm), _extra_block(64, 32, norm)])
    _randomise_bn(theirs)
    mapping = {}
    for i in range(2):
        for j, part in enumerate(("reduce", "dw", "expand")):
            mapping.update(_conv_bn_map(f"{i}.{part}", f"{i}.{j}"))
    their_state = theirs.state_dict()
    assert set(mapping) == set(ours.extra_layers.state_dict())
    ours.extra_layers.load_state_dict({k: their_state[v] for k, v in mapping.items()})
    x = torch.randn(2, 160, 9, 9)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        a, b = ours.extra_layers[1](ours.extra_layers[0](x)), theirs[1](theirs[0](x))
    assert a.shape == (2, 32, 3, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    info = {"C4": FeatureInfo(32, 16), "C5": FeatureInfo(48, 32)}
    head = SSDLiteHead(info, num_classes=4).train()
    # Batch 4: train-mode BN over a 1x1 map and only 2 images passes no gradient back (exactly).
    features = {"C4": torch.randn(4, 32, 8, 8), "C5": torch.randn(4, 48, 4, 4)}
    out = head(features)
    # One ground-truth box equal to the centre ratio-1 default box of each of the six maps
    # (8x8, 4x4, 2x2, 1x1, 1x1, 1x1), so every predictor has a positive to learn from.
    picks, start = [], 0
    for (h, w), n in zip([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1), (1, 1)],
                         head.default_boxes.num_anchors_per_location()):
        picks.append(start + ((h // 2) * w + w // 2) * n)
        start += h * w * n
    assert start == out["anchors"].shape[0]
    boxes = cxcywh_to_xyxy(out["anchors"][picks])
    labels = torch.arange(6) % 4
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = head.loss(out, [{"boxes": boxes, "labels": labels}, empty] * 2)
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_predict_contract_and_channels_last():
    torch.manual_seed(0)
    info = {"C4": FeatureInfo(32, 16), "C5": FeatureInfo(48, 32)}
    head = SSDLiteHead(info, num_classes=4, score_threshold=0.2, detections_per_image=10).eval()
    features = {"C4": torch.randn(2, 32, 10, 10), "C5": torch.randn(2, 48, 5, 5)}
    with torch.no_grad():
        out = head(features)
        out_cl = head({k: v.contiguous(memory_format=torch.channels_last) for k, v in features.items()})
    for key in out:
        torch.testing.assert_close(out_cl[key], out[key])
    with torch.no_grad():
        out["cls_logits"] = out["cls_logits"] * 40  # spread the softmax so some scores pass 0.2
    sizes = [(160, 160), (120, 200)]
    results = head.predict(out, sizes)
    assert len(results) == 2
    for (h, w), r in zip(sizes, results):
        assert set(r) == {"boxes", "scores", "labels"}
        assert 0 < len(r["scores"]) <= 10 and r["labels"].dtype == torch.int64
        assert ((r["labels"] >= 0) & (r["labels"] < 4)).all() and (r["scores"] > 0.2).all()
        assert (r["boxes"] >= 0).all() and (r["boxes"][:, 0::2] <= w).all() and (r["boxes"][:, 1::2] <= h).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()


def test_forward_is_traceable():
    info = {"C4": FeatureInfo(32, 16), "C5": FeatureInfo(48, 32)}
    head = SSDLiteHead(info, num_classes=4).eval()
    features = {"C4": torch.randn(1, 32, 8, 8), "C5": torch.randn(1, 48, 4, 4)}
    exported = torch.export.export(head, (features,))
    eager = head(features)
    traced = exported.module()(features)
    for key in eager:
        torch.testing.assert_close(traced[key], eager[key])


def test_config_matches_constructor_and_builds():
    cfg = OmegaConf.load(CONFIG)
    assert cfg._target_ == "heads.ssdlite.SSDLiteHead" and cfg._partial_ and cfg.task == "detection"
    defaults = {k: v.default for k, v in inspect.signature(SSDLiteHead).parameters.items()
                if v.default is not inspect.Parameter.empty}
    # `task` is read by the start-up checks and dropped by tasks.training.model.build_model before instantiating.
    knobs = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_") and k != "task"}
    assert set(knobs) == set(defaults)
    for key, value in knobs.items():
        default = defaults[key]
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    backbone = MobileNetV2(out_features=tuple(cfg.in_features))
    options = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "task"}
    head = instantiate(options)(feature_info=backbone.feature_info, num_classes=80)
    assert isinstance(head, SSDLiteHead) and head.in_features == ("C4", "C5")


def test_bad_options_raise():
    info = {"C4": FeatureInfo(32, 16), "C5": FeatureInfo(48, 32)}
    with pytest.raises(ValueError, match="C3"):
        SSDLiteHead(info, 4, in_features=("C3", "C5"))
    with pytest.raises(ValueError, match="num_classes"):
        SSDLiteHead(info, 0)
