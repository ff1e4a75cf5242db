"""BatchNorm folding, ONNX export and the ONNX Runtime runner against the PyTorch model they come from."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import ROOT, TINY, assert_same_detections
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbones.layers import ConvBNAct
from tasks.deploy.fold_bn import fold_batchnorm, fold_conv_bn
from tasks.deploy.in_graph import DECODED_OUTPUTS
from tasks.deploy.onnx_runtime import OnnxModel, decode_segmentation
from tasks.deploy.sidecar import read_sidecar
from tasks.detection.coco import CocoDetection
from tasks.training.trained import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine terms, so that folding has something to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def test_fold_conv_bn_matches_torch_fusion():
    """Against PyTorch's own conv-BN fusion on a grouped, strided, dilated conv with a bias."""
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=2, bias=True)
    bn = _randomise_batchnorm(nn.Sequential(nn.BatchNorm2d(16, eps=1e-3)))[0]
    ours, theirs = fold_conv_bn(conv, bn), fuse_conv_bn_eval(conv.eval(), bn)
    torch.testing.assert_close(ours.weight, theirs.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.bias, theirs.bias, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("task", sorted(TINY))
def test_folded_model_equals_the_original(task, artifacts):
    model, _ = load_trained_model(artifacts[task]["checkpoint"])
    _randomise_batchnorm(model)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.folded_batchnorms == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = _inputs(2, 1)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_fold_leaves_convs_without_a_following_bn():
    model = nn.Sequential(ConvBNAct(3, 4, 3), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
    folded = fold_batchnorm(_randomise_batchnorm(model))
    assert folded.folded_batchnorms == 1
    assert isinstance(folded[3], nn.BatchNorm2d)  # a BN after a ReLU is not foldable
    x = _inputs(1, 2)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", sorted(TINY))
def test_onnxruntime_equals_pytorch_at_batch_1_and_3(task, artifacts):
    model, _ = load_trained_model(artifacts[task]["checkpoint"])
    runner = OnnxModel(artifacts[task]["onnx"], threads=1)
    graph_input = onnx.load(artifacts[task]["onnx"]).graph.input[0].type.tensor_type.shape.dim
    assert graph_input[0].dim_param and [d.dim_value for d in graph_input[1:]] == [3, 64, 64]
    worst = 0.0
    for batch in (1, 3):
        x = _inputs(batch, batch)
        with torch.no_grad():
            expected = model(x)
        got = runner(x)
        # detection graphs also end in the dense part of the decoding (decode_in_graph; tests/test_decode_in_graph.py)
        assert set(got) - set(expected) == (set(DECODED_OUTPUTS) if task == "detection" else set())
        for name in expected:
            assert got[name].shape == expected[name].shape
            worst = max(worst, float((got[name] - expected[name]).abs().max()))
    assert worst < 1e-4, worst


def test_detection_after_nms_is_the_same_in_both_runtimes(artifacts):
    model, _ = load_trained_model(artifacts["detection"]["checkpoint"])
    runner = OnnxModel(artifacts["detection"]["onnx"], threads=1)
    x = _inputs(3, 7)
    sizes = [(64, 64), (120, 90), (48, 200)]
    with torch.no_grad():
        expected = model.predict(model(x), sizes)
    got = runner.predict(runner(x), sizes)
    assert_same_detections(expected, got)


def test_segmentation_decode_equals_the_heads_predict(artifacts):
    model, _ = load_trained_model(artifacts["segmentation"]["checkpoint"])
    with torch.no_grad():
        logits = model(_inputs(2, 3))["logits"]
    sizes, valid = [(50, 64), (100, 80)], [(50, 64), (64, 51)]
    for kwargs in ({}, {"input_size": (64, 64), "valid_sizes": valid}):
        expected = model.head.predict({"logits": logits}, sizes, **kwargs)
        got = decode_segmentation(logits.numpy(), sizes, **kwargs)
        for e, g in zip(expected, got):
            assert torch.equal(g["mask"], e["mask"])


def test_sidecar_describes_the_model(artifacts):
    det = read_sidecar(artifacts["detection"]["onnx"])
    coco = CocoDetection(f"{artifacts['detection']['data']}/val2017",
                         f"{artifacts['detection']['data']}/annotations/instances_val2017.json")
    assert det["task"] == "detection" and det["input_size"] == [64, 64]
    assert det["class_names"] == coco.class_names and det["label_to_cat_id"] == coco.label_to_cat_id
    assert det["mean"] == pytest.approx([0.485, 0.456, 0.406]) and det["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert det["output_names"] == ["cls_logits", "bbox_regression", "anchors", *DECODED_OUTPUTS]
    assert det["decode_in_graph"] is True and det["output_shapes"]["anchor_boxes"][0] == "batch"
    assert det["exporter"]["dynamo"] is True and det["batchnorms_folded"] > 0
    assert max(det["parity"]["max_abs_diff"].values()) < 1e-4
    seg = read_sidecar(artifacts["segmentation"]["onnx"])
    assert seg["class_names"] == ["background", "circle", "square", "triangle"] and seg["label_to_cat_id"] is None
    assert seg["output_shapes"]["logits"] == ["batch", 4, 4, 4]  # stride 16 of 64 px


def test_export_cli_with_the_torchscript_exporter_and_upsampled_logits(artifacts, tmp_path):
    out = tmp_path / "seg.onnx"
    checkpoint = artifacts["segmentation"]["checkpoint"]
    result = subprocess.run([sys.executable, "-m", "tasks.export", f"checkpoint={checkpoint}", f"output={out}",
                             "dynamo=false", "opset=17", "upsample_logits=true", "threads=1",
                             f"hydra.run.dir={tmp_path / 'hydra'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max |onnxruntime - pytorch|" in result.stdout
    meta = read_sidecar(out)
    assert meta["exporter"] == {"torch": torch.__version__, "dynamo": False, "opset": 17}
    assert meta["output_shapes"]["logits"] == ["batch", 4, 64, 64]
    model, _ = load_trained_model(artifacts["segmentation"]["checkpoint"])
    x = _inputs(3, 4)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(model(x)["logits"], size=(64, 64), mode="bilinear",
                                                   align_corners=False)
    assert float((OnnxModel(out, threads=1)(x)["logits"] - expected).abs().max()) < 1e-4


def test_bad_inputs_fail_with_one_sentence(artifacts, tmp_path):
    runner = OnnxModel(artifacts["segmentation"]["onnx"], threads=1)
    with pytest.raises(ValueError, match=r"takes images \[batch, 3, 64, 64\]"):
        runner(np.zeros((1, 3, 32, 32), np.float32))
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(Path(artifacts["segmentation"]["onnx"]).read_bytes())
    with pytest.raises(FileNotFoundError, match="sidecar"):
        OnnxModel(lone)
