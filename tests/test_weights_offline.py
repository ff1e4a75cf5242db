"""Offline or missing published weights: one sentence naming what was tried (the url or hub id and the
local cache path) and how to pass a local file, within seconds; a cached file loads without network.
Nothing is downloaded: the urls point at a closed local port (127.0.0.1:9)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torchvision

from backbones import MobileNetV1, MobileNetV2
from backbones.weights import WeightsUnavailableError, load_pretrained
from tasks.training.model import build_backbone

CLOSED = "http://127.0.0.1:9"


def test_torchvision_offline_names_url_and_cache_quickly(tmp_path, monkeypatch):
    url, cache = f"{CLOSED}/models/mobilenet_v2-b0353104.pth", tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth"
    monkeypatch.setattr("backbones.weights.torchvision_location", lambda name: (url, cache))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        MobileNetV2(pretrained="imagenet")
    assert time.perf_counter() - start < 5.0  # one connection attempt, no retry loop
    message = str(err.value)
    assert url in message and str(cache) in message and "backbone.pretrained=/path/to/weights.pth" in message
    assert "\n" not in message


def test_torchvision_weights_in_the_cache_load_without_network(tmp_path, monkeypatch):
    peer = torchvision.models.mobilenet_v2().eval()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(peer.state_dict(), tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth")
    monkeypatch.setattr("backbones.weights._unreachable", lambda url: pytest.fail("the network was asked"))
    ours = MobileNetV2(pretrained="torchvision:IMAGENET1K_V1").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["C5"], peer.features(x), atol=1e-5, rtol=0)


def test_timm_offline_names_hub_id_and_cache_quickly(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setattr("backbones.weights.HF_HUB", CLOSED)
    monkeypatch.setattr("backbones.weights.timm_location", lambda name: ("timm/" + name, tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        load_pretrained(MobileNetV1(act="relu6"), "timm:mobilenetv1_100")
    assert time.perf_counter() - start < 5.0
    assert "timm/mobilenetv1_100" in str(err.value) and str(tmp_path / "hub") in str(err.value)


def test_timm_weights_in_the_hub_cache_load_without_network(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    peer = timm.create_model("mobilenetv1_100", pretrained=False).eval()
    snapshot = tmp_path / "hub" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
                                str(snapshot / "model.safetensors"))
    monkeypatch.setattr("backbones.weights.timm_location", lambda name: ("timm/" + name, tmp_path / "hub"))
    monkeypatch.setattr("backbones.weights._unreachable", lambda url: pytest.fail("the network was asked"))
    ours = load_pretrained(MobileNetV1(act="relu6"), "timm:mobilenetv1_100").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["C5"], peer.forward_features(x), atol=1e-4, rtol=0)


def test_a_missing_local_file_is_not_hidden_by_hydra(tmp_path):
    """Hydra wraps a constructor's error in InstantiationException; the user's sentence must come out."""
    missing = tmp_path / "weights.pth"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {missing} does not exist"):
        build_backbone({"_target_": "backbones.MobileNetV2", "pretrained": str(missing), "mean": [0.5] * 3})


@pytest.mark.slow
def test_train_exits_2_with_one_sentence_for_a_missing_weights_file(tmp_path):
    missing = tmp_path / "weights.pth"
    result = subprocess.run([sys.executable, "-m", "tasks.train", f"backbone.pretrained={missing}",
                             "dataset.root=" + str(tmp_path / "shapes"), "dataset.prepare.num_train=4",
                             "dataset.prepare.num_val=2", "dataset.prepare.image_size=64",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: checkpoint") and str(missing) in lines[-1]


def test_a_checkpoint_fine_tuned_from_imagenet_weights_loads_offline(tmp_path, monkeypatch):
    """Evaluate/predict/export rebuild the model from the checkpoint's config, which says
    pretrained=imagenet; the checkpoint holds every weight, so nothing may be downloaded."""
    from helpers import compose_train
    from omegaconf import OmegaConf

    from tasks.training.checkpoint import save_checkpoint
    from tasks.training.model import build_model
    from tasks.training.trained import load_trained_model

    cfg = compose_train(["backbone.width_mult=0.25", "head.extra_depths=[32,32]"])
    model = build_model(cfg.backbone, cfg.head, 3)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["backbone"]["pretrained"] = "imagenet"
    config["dataset"]["num_classes"] = 3
    save_checkpoint({"model": model.state_dict(), "config": config}, tmp_path / "best.ckpt")
    monkeypatch.setattr("backbones.weights._read_source", lambda *a: pytest.fail("weights were fetched"))
    loaded, _ = load_trained_model(tmp_path / "best.ckpt")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0)
