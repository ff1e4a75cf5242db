"""Converted checkpoints must reproduce the peer model: same logits, same features, in eval mode.

Peers (torchvision's mobilenet_v2, timm's mobilenetv1_*) are built with random weights and random
BN statistics, saved with torch.save, and loaded through the same path a user's file takes.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from backbones import ImageClassifier, MobileNetV1, MobileNetV2
from backbones.weights import (
    SOURCES,
    convert_timm_mobilenet_v1,
    convert_torchvision_mobilenet_v2,
    load_pretrained,
)

SIZE = 128
TIMM_WIDTHS = {"mobilenetv1_100": 1.0, "mobilenetv1_125": 1.25}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine and running stats (defaults would hide a swapped BN), and random fc bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=g) * 0.1)
    return model.eval()


def relu6_v1(width_mult: float) -> MobileNetV1:
    """Our MobileNetV1 with timm's activation (the only layout difference from the paper's)."""
    return MobileNetV1(width_mult=width_mult, act="relu6")


def images(scale: float = 1.0) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * scale


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tv_files(tmp_path_factory) -> dict[float, tuple[nn.Module, Path]]:
    folder = tmp_path_factory.mktemp("torchvision")
    out = {}
    for i, width in enumerate((1.0, 0.5, 1.4)):
        peer = randomise(torchvision.models.mobilenet_v2(width_mult=width), seed=i)
        path = folder / f"mobilenet_v2_{width}.pth"
        torch.save(peer.state_dict(), path)
        out[width] = (peer, path)
    return out


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    timm = pytest.importorskip("timm")
    folder = tmp_path_factory.mktemp("timm")
    out = {}
    for i, name in enumerate(TIMM_WIDTHS):
        peer = randomise(timm.create_model(name, pretrained=False), seed=10 + i)
        path = folder / f"{name}.pth"
        torch.save(peer.state_dict(), path)
        out[name] = (peer, path)
    return out


@pytest.mark.parametrize("width", [1.0, 0.5, 1.4])
@torch.no_grad()
def test_torchvision_mobilenet_v2_file_gives_same_logits_and_features(tv_files, width):
    peer, path = tv_files[width]
    ours = load_pretrained(ImageClassifier(MobileNetV2(width_mult=width)), str(path)).eval()
    x = images()
    assert_same(ours(x), peer(x))
    assert_same(ours.backbone(x)["C5"], peer.features(x))
    theirs = peer.state_dict()
    mine = ours.state_dict()
    assert mine["backbone.stem.bn.num_batches_tracked"] == theirs["features.0.1.num_batches_tracked"]
    assert mine["backbone.last_conv.bn.num_batches_tracked"] == theirs["features.18.1.num_batches_tracked"]


@pytest.mark.parametrize("name", list(TIMM_WIDTHS))
@torch.no_grad()
def test_timm_mobilenet_v1_file_gives_same_logits_and_features(timm_files, name):
    peer, path = timm_files[name]
    ours = load_pretrained(ImageClassifier(relu6_v1(TIMM_WIDTHS[name])), str(path)).eval()
    x = images(scale=20.0)  # large enough that ReLU6 clips: the activation is part of what is compared
    assert_same(ours(x), peer(x))
    assert_same(ours.backbone(x)["C5"], peer.forward_features(x))
    assert ours.state_dict()["backbone.blocks.12.pw.bn.num_batches_tracked"] == \
        peer.state_dict()["blocks.4.1.bn2.num_batches_tracked"]


@torch.no_grad()
def test_timm_weights_into_our_relu_mobilenet_v1_are_refused_unless_not_strict(timm_files):
    peer, path = timm_files["mobilenetv1_100"]
    with pytest.raises(ValueError, match=r"trained with ReLU6, but MobileNetV1\(width_mult=1.0\) uses ReLU"):
        load_pretrained(ImageClassifier(MobileNetV1()), str(path))
    ours = ImageClassifier(MobileNetV1()).eval()
    with pytest.warns(UserWarning, match="ReLU6"):
        load_pretrained(ours, str(path), strict=False)
    torch.testing.assert_close(ours.backbone.blocks[12].pw.conv.weight, peer.blocks[4][1].conv_pw.weight)
    x = images(scale=20.0)
    assert (ours(x) - peer(x)).abs().max() > 1e-3  # the activation alone changes the outputs


@torch.no_grad()
def test_backbone_only_load_drops_the_classifier(tv_files):
    peer, path = tv_files[1.0]
    x = images()
    backbone = MobileNetV2(out_features=("C4", "C5"), pretrained=str(path)).eval()  # constructor path
    expansion = {}
    hook = peer.features[14].conv[0].register_forward_hook(lambda m, i, o: expansion.setdefault("C4", o))
    c5 = peer.features(x)
    hook.remove()
    out = backbone(x)
    assert_same(out["C5"], c5)
    assert_same(out["C4"], expansion["C4"])  # expansion of features[14], the stride-2 block at stride 16

    v2_star = load_pretrained(MobileNetV2(last_conv=False), str(path)).eval()  # drops the 1280 conv too
    assert_same(v2_star(x)["C5"], peer.features[:18](x))


@torch.no_grad()
def test_timm_backbone_only_load(timm_files):
    peer, path = timm_files["mobilenetv1_125"]
    backbone = load_pretrained(relu6_v1(1.25), str(path)).eval()
    x = images(scale=20.0)
    assert_same(backbone(x)["C5"], peer.forward_features(x))


def test_wrong_width_names_first_mismatching_key_and_both_shapes(tv_files, timm_files):
    path = tv_files[1.0][1]
    expected = (f"checkpoint {path} does not fit MobileNetV2(width_mult=0.5): stem.conv.weight is "
                f"[32, 3, 3, 3] in the checkpoint but [16, 3, 3, 3] in the model.")
    with pytest.raises(ValueError) as err:
        load_pretrained(MobileNetV2(width_mult=0.5), str(path))
    assert str(err.value) == expected

    path = timm_files["mobilenetv1_125"][1]
    expected = (f"checkpoint {path} does not fit ImageClassifier(MobileNetV1(width_mult=1.0), "
                f"num_classes=1000): backbone.stem.conv.weight is [40, 3, 3, 3] in the checkpoint but "
                f"[32, 3, 3, 3] in the model.")
    with pytest.raises(ValueError) as err:
        load_pretrained(ImageClassifier(relu6_v1(1.0)), str(path))
    assert str(err.value) == expected


def test_other_class_count_names_the_fc(tv_files):
    path = tv_files[1.0][1]
    expected = "fc.weight is [1000, 1280] in the checkpoint but [10, 1280] in the model."
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_pretrained(ImageClassifier(MobileNetV2(), num_classes=10), str(path))


def test_wrong_model_family_is_one_sentence(tv_files, timm_files):
    with pytest.raises(ValueError, match=r"holds torchvision's MobileNetV2 weights, which do not fit "
                                         r"MobileNetV1\(width_mult=1.0\)"):
        load_pretrained(MobileNetV1(), str(tv_files[1.0][1]))
    with pytest.raises(ValueError, match=r"holds timm's MobileNetV1 weights, which do not fit MobileNetV2"):
        load_pretrained(MobileNetV2(), str(timm_files["mobilenetv1_100"][1]))


@pytest.mark.parametrize("source", ["torchvision:IMAGENET1K_V3", "timm:mobilenetv1_050", "imagenet1k"])
def test_unknown_source_lists_the_accepted_ones(source):
    with pytest.raises(ValueError) as err:
        load_pretrained(MobileNetV2(), source)
    message = str(err.value)
    assert repr(source) in message
    assert all(name in message for name in SOURCES)
    assert message.count(". ") == 0 and message.endswith(".")


def test_missing_file_and_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(MobileNetV2(), str(tmp_path / "nowhere.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {bad} cannot be read")):
        load_pretrained(MobileNetV2(), str(bad))


@torch.no_grad()
def test_torchvision_by_name_uses_torchvisions_weights_api(tv_files, monkeypatch):
    monkeypatch.setattr("backbones.weights._unreachable", lambda url: None)  # as if online
    peer, _ = tv_files[1.0]
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append((self.name, kwargs))
        return peer.state_dict()

    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights, "get_state_dict", fake_get_state_dict)
    ours = load_pretrained(ImageClassifier(MobileNetV2()), "torchvision:IMAGENET1K_V2").eval()
    assert calls and calls[0][0] == "IMAGENET1K_V2" and calls[0][1].get("progress") is True
    x = images()
    assert_same(ours(x), peer(x))


@torch.no_grad()
def test_timm_by_name_uses_timm_and_says_how_to_install_it(timm_files, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setattr("backbones.weights._unreachable", lambda url: None)  # as if online
    peer, _ = timm_files["mobilenetv1_100"]

    def fake_create_model(name, pretrained=False, **kwargs):
        assert name == "mobilenetv1_100" and pretrained is True
        return peer

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    ours = load_pretrained(relu6_v1(1.0), "timm:mobilenetv1_100").eval()
    x = images(scale=20.0)
    assert_same(ours(x)["C5"], peer.forward_features(x))

    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match=re.escape("install mobilevision[timm]")):
        load_pretrained(relu6_v1(1.0), "timm:mobilenetv1_100")


def test_converters_return_exactly_our_classifier_key_space(tv_files, timm_files):
    tv_peer = tv_files[1.0][0]
    converted = convert_torchvision_mobilenet_v2(tv_peer.state_dict())
    assert list(converted) == list(ImageClassifier(MobileNetV2()).state_dict())
    torch.testing.assert_close(converted["backbone.blocks.16.project.bn.running_var"],
                               tv_peer.features[17].conv[3].running_var)

    timm_peer = timm_files["mobilenetv1_100"][0]
    converted = convert_timm_mobilenet_v1(timm_peer.state_dict())
    assert list(converted) == list(ImageClassifier(MobileNetV1()).state_dict())
    torch.testing.assert_close(converted["backbone.blocks.5.dw.bn.running_mean"],
                               timm_peer.blocks[3][0].bn1.running_mean)
    with pytest.raises(ValueError, match="features.1.block.0.0.weight is not part of torchvision's"):
        convert_torchvision_mobilenet_v2({"features.1.block.0.0.weight": torch.zeros(1)})


@torch.no_grad()
def test_mobilevision_files_round_trip(tmp_path):
    torch.manual_seed(0)
    source = randomise(ImageClassifier(MobileNetV2(width_mult=0.5)), seed=3)
    path = tmp_path / "classifier.pt"
    torch.save(source.state_dict(), path)
    x = images()
    assert_same(load_pretrained(ImageClassifier(MobileNetV2(width_mult=0.5)), str(path)).eval()(x), source(x))

    # a training checkpoint ({"model": backbone.* + head.*}) feeds a bare backbone
    checkpoint = tmp_path / "last.ckpt"
    state = {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    torch.save({"model": {**state, "head.conv.weight": torch.zeros(3)}, "step": 7}, checkpoint)
    backbone = load_pretrained(MobileNetV2(width_mult=0.5), str(checkpoint)).eval()
    assert_same(backbone(x)["C5"], source.backbone(x)["C5"])


def test_safetensors_file(tv_files, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    peer, _ = tv_files[0.5]
    path = tmp_path / "mobilenet_v2.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    ours = load_pretrained(ImageClassifier(MobileNetV2(width_mult=0.5)), str(path)).eval()
    with torch.no_grad():
        assert_same(ours(images()), peer(images()))


@torch.no_grad()
def test_imagenet_alias_picks_each_backbones_published_weights(tv_files, timm_files, monkeypatch):
    """`pretrained: imagenet` survives a backbone swap: V2 -> torchvision, V1 -> timm."""
    import torchvision

    monkeypatch.setattr("backbones.weights._unreachable", lambda url: None)  # as if online
    tv_peer, _ = tv_files[1.0]
    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, "get_state_dict",
                        lambda *a, **k: tv_peer.state_dict(), raising=False)
    v2 = MobileNetV2(pretrained="imagenet").eval()
    assert_same(v2(images())["C5"], tv_peer.features(images()))

    timm = pytest.importorskip("timm")
    peer, _ = timm_files["mobilenetv1_100"]
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **k: peer)
    assert_same(MobileNetV1(act="relu6", pretrained="imagenet").eval()(images())["C5"],
                peer.forward_features(images()))
    with pytest.warns(UserWarning, match="trained with ReLU6"):
        MobileNetV1(pretrained="imagenet")  # the paper's ReLU: loads for fine-tuning, and says so
    with pytest.raises(ValueError, match="no published weights for MobileNetV2\\(width_mult=0.5\\)"):
        MobileNetV2(width_mult=0.5, pretrained="imagenet")
