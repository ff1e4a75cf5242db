import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from backbones import FeatureInfo, MobileNetV1, MobileNetV2
from heads.deeplabv3 import DeepLabV3Head
from tasks.analysis.complexity import count_complexity

CONF = Path(__file__).resolve().parents[1] / "conf"


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, head: DeepLabV3Head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images):
        return self.head(self.backbone(images))["logits"]


def mnet_v2_star():
    return MobileNetV2(output_stride=16, last_conv=False, out_features=("C5",))


def mnet_v1():
    return MobileNetV1(output_stride=16, out_features=("C5",))


# MobileNetV2 paper, Table 7 (513x513, 21 classes): params (M), direct-count MAdds (B), printed MAdds (B).
TABLE7 = {
    "MNetV2*-OS16-light": (mnet_v2_star, False, 2.11, 2.74, 2.75),
    "MNetV2*-OS16-ASPP": (mnet_v2_star, True, 4.52, 5.36, 5.8),
    "MNetV1-OS16-ASPP": (mnet_v1, True, 11.15, 12.76, 14.25),
}


def tf_space_to_batch_extra_madds(head: DeepLabV3Head, feature_size: int) -> int:
    """TF runs a rate-r 3x3 'SAME' conv through space_to_batch: the padded input is split into r x r
    blocks and each block gives ceil(n / r) outputs per side, so it computes (r * ceil(n / r))^2
    positions instead of n^2. The MAdds of those extra positions."""
    extra = 0
    for module in head.modules():
        if isinstance(module, nn.Conv2d) and module.dilation[0] > 1:
            r = module.dilation[0]
            computed = (r * math.ceil(feature_size / r)) ** 2
            extra += (computed - feature_size**2) * module.in_channels * module.out_channels * 9
    return extra


@pytest.mark.parametrize("row", list(TABLE7))
def test_table7_params_and_madds(row):
    make_backbone, aspp, params_m, madds_b, printed_b = TABLE7[row]
    backbone = make_backbone()
    head = DeepLabV3Head(backbone.feature_info, 21, aspp=aspp)
    result = count_complexity(Segmenter(backbone, head).eval(), torch.zeros(1, 3, 513, 513))
    assert round(result.params / 1e6, 2) == params_m
    assert result.madds / 1e9 == pytest.approx(madds_b, abs=0.005)
    # The printed MAdds of the ASPP rows are what TF's space_to_batch atrous convs compute at the
    # 33x33 feature map (36x36 positions for rates 6, 12 and 18); the light head has no atrous conv.
    with_tf_padding = (result.madds + tf_space_to_batch_extra_madds(head, 33)) / 1e9
    assert with_tf_padding == pytest.approx(printed_b, rel=0.005)


def _randomise(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def _to_torchvision_name(name: str, pooling_branch: int) -> str:
    rules = [
        (rf"aspp\.branches\.{pooling_branch}\.conv\.conv\.", f"0.convs.{pooling_branch}.1."),
        (rf"aspp\.branches\.{pooling_branch}\.conv\.bn\.", f"0.convs.{pooling_branch}.2."),
        (r"aspp\.branches\.(\d+)\.conv\.", r"0.convs.\1.0."),
        (r"aspp\.branches\.(\d+)\.bn\.", r"0.convs.\1.1."),
        (r"aspp\.project\.conv\.", "0.project.0."),
        (r"aspp\.project\.bn\.", "0.project.1."),
        (r"refine\.conv\.", "1."),
        (r"refine\.bn\.", "2."),
        (r"classifier\.", "4."),
    ]
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    raise AssertionError(f"no mapping for {name}")


@pytest.mark.parametrize("rates", [(6, 12, 18), (12, 24, 36)])
def test_aspp_matches_torchvision_deeplabhead(rates):
    torch.manual_seed(0)
    info = {"C5": FeatureInfo(96, 16)}
    ours = DeepLabV3Head(info, 21, aspp=True, atrous_rates=rates, refine_3x3=True)
    theirs = DeepLabHead(96, 21, atrous_rates=rates)
    _randomise(ours, 1)
    state = {_to_torchvision_name(k, len(rates) + 1): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    ours.eval(), theirs.eval()
    features = torch.randn(2, 96, 17, 23)
    expected = theirs(features)
    assert torch.allclose(ours({"C5": features})["logits"], expected, atol=1e-5)


def test_default_aspp_is_torchvision_aspp_plus_classifier():
    """Without torchvision's extra 3x3 conv, the head is exactly its ASPP followed by a 1x1 classifier."""
    torch.manual_seed(0)
    ours = DeepLabV3Head({"C5": FeatureInfo(64, 16)}, 5, aspp=True)
    assert ours.atrous_rates == (6, 12, 18)
    aspp = TorchvisionASPP(64, (6, 12, 18))
    classifier = nn.Conv2d(256, 5, 1)
    _randomise(ours, 2)
    mapped = {_to_torchvision_name(k, 4): v for k, v in ours.state_dict().items()}
    aspp.load_state_dict({k[2:]: v for k, v in mapped.items() if k.startswith("0.")})
    classifier.load_state_dict({k[2:]: v for k, v in mapped.items() if k.startswith("4.")})
    ours.eval(), aspp.eval()
    features = torch.randn(1, 64, 9, 12)
    assert torch.allclose(ours({"C5": features})["logits"], classifier(aspp(features)), atol=1e-5)


def test_atrous_rates_follow_the_output_stride():
    assert DeepLabV3Head({"C5": FeatureInfo(320, 16)}, 21, aspp=True).atrous_rates == (6, 12, 18)
    assert DeepLabV3Head({"C5": FeatureInfo(320, 8)}, 21, aspp=True).atrous_rates == (12, 24, 36)
    light = DeepLabV3Head({"C5": FeatureInfo(320, 16)}, 21)
    assert light.atrous_rates == () and len(light.aspp.branches) == 2
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in light.modules())


def test_bad_options_raise_one_clear_sentence():
    info = {"C5": FeatureInfo(320, 16)}
    with pytest.raises(ValueError, match="in_features asks for 'C4'"):
        DeepLabV3Head(info, 21, in_features=("C4",))
    with pytest.raises(ValueError, match="head.aspp is false"):
        DeepLabV3Head(info, 21, atrous_rates=(6, 12, 18))


def test_loss_is_log_k_for_flat_logits_and_ignores_255():
    head = DeepLabV3Head({"C5": FeatureInfo(8, 16)}, 21)
    logits = torch.zeros(2, 21, 4, 5, requires_grad=True)
    masks = torch.randint(0, 21, (2, 64, 80))
    masks[:, :10] = 255
    loss = head.loss({"logits": logits}, [{"mask": m} for m in masks])["loss_seg"]
    assert loss.item() == pytest.approx(math.log(21), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # A real prediction: matches cross-entropy on the bilinearly upsampled logits over valid pixels.
    logits = torch.randn(2, 21, 4, 5)
    up = F.interpolate(logits, size=(64, 80), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, masks, ignore_index=255)
    assert head.loss({"logits": logits}, masks)["loss_seg"].item() == pytest.approx(expected.item(), rel=1e-5)
    all_ignored = torch.full((2, 64, 80), 255)
    assert head.loss({"logits": logits}, all_ignored)["loss_seg"].item() == 0.0


def test_forward_and_training_step_on_the_real_backbone():
    backbone = MobileNetV2(width_mult=0.35, output_stride=16, last_conv=False, out_features=("C5",))
    head = DeepLabV3Head(backbone.feature_info, 21)
    images = torch.randn(2, 3, 65, 97)
    outputs = head(backbone(images))
    assert outputs["logits"].shape == (2, 21, 5, 7)
    masks = torch.randint(0, 21, (2, 65, 97))
    head.loss(outputs, [{"mask": m} for m in masks])["loss_seg"].backward()
    assert head.classifier.weight.grad is not None and backbone.stem.conv.weight.grad is not None


def test_predict_returns_masks_at_the_requested_sizes():
    head = DeepLabV3Head({"C5": FeatureInfo(8, 16)}, 21)
    logits = torch.zeros(2, 21, 6, 8)
    logits[0, 7, :, :4] = 5.0  # left half: class 7, right half: class 0
    logits[0, 0, :, 4:] = 5.0
    logits[1, 3] = 1.0
    results = head.predict({"logits": logits}, [(375, 500), (40, 33)])
    assert [tuple(r["mask"].shape) for r in results] == [(375, 500), (40, 33)]
    assert all(r["mask"].dtype == torch.int64 for r in results)
    left, right = results[0]["mask"][:, :240], results[0]["mask"][:, 260:]
    assert (left == 7).all() and (right == 0).all()
    assert (results[1]["mask"] == 3).all()


def test_predict_crops_the_padding_of_the_eval_input():
    """Eval inputs hold the image top-left and pad the rest; predict maps back to the original size."""
    head = DeepLabV3Head({"C5": FeatureInfo(8, 16)}, 4)
    labels = torch.full((64, 64), 3)  # padding region predicted as class 3
    labels[:40, :15] = 1
    labels[:40, 15:30] = 2
    logits = F.one_hot(labels, 4).permute(2, 0, 1)[None].float() * 10
    (result,) = head.predict({"logits": logits}, [(80, 60)], input_size=(64, 64), valid_sizes=[(40, 30)])
    assert result["mask"].shape == (80, 60)
    assert (result["mask"][:, :29] == 1).all() and (result["mask"][:, 31:] == 2).all()


@pytest.mark.parametrize("name, aspp", [("deeplabv3", False), ("deeplabv3_aspp", True)])
def test_head_configs_build_the_head(name, aspp):
    cfg = OmegaConf.load(CONF / "head" / f"{name}.yaml")
    assert cfg.task == "segmentation" and list(cfg.in_features) == ["C5"]
    del cfg["task"]
    head = instantiate(cfg)({"C5": FeatureInfo(320, 16)}, num_classes=21)
    assert isinstance(head, DeepLabV3Head)
    assert head.atrous_rates == ((6, 12, 18) if aspp else ())
