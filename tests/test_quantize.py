"""Post-training INT8 quantization end to end on the tiny checkpoints (no accuracy claim at 1 epoch)."""
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tasks.deploy.in_graph import DECODED_OUTPUTS
from tasks.deploy.int8 import quantize_checkpoint
from tasks.deploy.onnx_runtime import OnnxModel
from tasks.deploy.sidecar import read_sidecar
from tasks.evaluate import evaluate_checkpoint
from tasks.training.trained import rebase_dataset_root

METRIC = {"detection": "AP", "segmentation": "mIoU"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _val_images(onnx_path: str, count: int) -> np.ndarray:
    cfg = OmegaConf.create(read_sidecar(onnx_path)["train_config"])
    val = instantiate(cfg.dataset.val)
    return np.stack([val[i][0].numpy() for i in range(min(count, len(val)))])


@pytest.mark.parametrize("task", sorted(METRIC))
def test_int8_model_is_measured_against_fp32_and_tracks_its_outputs(task, artifacts, tmp_path):
    report = quantize_checkpoint(None, tmp_path, calibration_images=4, latency_runs=5, warmup_runs=1, threads=1,
                                 agreement_images=4, onnx=artifacts[task]["onnx"])
    assert report["metric"] == METRIC[task] and report["calibration"]["images"] == 4
    for name in ("fp32", "int8"):
        assert report[name]["latency_ms"] > 0
        assert 0.0 <= report[name]["metric"] <= 1.0 and math.isfinite(report[name]["metrics"][METRIC[task]])
    assert report["metric_drop"] == pytest.approx(report["fp32"]["metric"] - report["int8"]["metric"])
    assert json.loads((tmp_path / "quantize.json").read_text()) == json.loads(json.dumps(report))

    # fp32 through ONNX Runtime scores what the PyTorch checkpoint scores through tasks.evaluate.
    reference = evaluate_checkpoint(artifacts[task]["checkpoint"], tmp_path / "eval", batch_size=4, num_workers=0,
                                    progress=False)
    assert report["fp32"]["metric"] == pytest.approx(reference[METRIC[task]], abs=1e-3)

    # The INT8 file really holds int8 weights in QDQ form, and is smaller.
    int8_path = tmp_path / "model.int8.onnx"
    graph = onnx.load(int8_path).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    assert report["int8"]["size_mb"] < report["fp32"]["size_mb"]
    assert read_sidecar(int8_path)["quantization"]["format"] == "QDQ"
    # no quantization step on the decoded outputs: the INT8 graph ends in the raw ones, and its sidecar says so
    assert not {o.name for o in graph.output} & set(DECODED_OUTPUTS)
    assert read_sidecar(int8_path)["decode_in_graph"] is False

    # Independently of the report: INT8 outputs follow fp32's on val images.
    images = _val_images(artifacts[task]["onnx"], 4)
    fp32 = OnnxModel(artifacts[task]["onnx"], threads=1).run(images)
    int8 = OnnxModel(int8_path, threads=1).run(images)
    if task == "segmentation":
        agreement = (fp32["logits"].argmax(1) == int8["logits"].argmax(1)).mean()
        assert agreement > 0.9, agreement
    else:
        for name in ("cls_logits", "bbox_regression"):
            correlation = np.corrcoef(fp32[name].reshape(-1), int8[name].reshape(-1))[0, 1]
            assert correlation > 0.9, (name, correlation)


def test_cli_prints_the_table_and_fails_loudly_past_the_tolerance(artifacts, tmp_path):
    """A negative tolerance can never be met: the loud warning and fail_on_drop's exit are exercised."""
    result = subprocess.run([sys.executable, "-m", "tasks.quantize", f"onnx={artifacts['segmentation']['onnx']}",
                             "calibration_images=2", "latency_runs=3", "warmup_runs=1", "max_metric_drop=-1",
                             "fail_on_drop=true", "threads=1", f"output_dir={tmp_path}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "fp32 onnxruntime" in result.stdout and "int8 onnxruntime (QDQ)" in result.stdout
    assert "latency ms (median of 3, batch 1)" in result.stdout
    assert "WARNING: INT8 LOSES" in result.stdout
    assert "max_metric_drop=-1" in result.stderr and "fail_on_drop=true" in result.stderr
    report = json.loads((tmp_path / "quantize.json").read_text())
    assert report["within_tolerance"] is False


def test_quantize_needs_a_model(tmp_path):
    with pytest.raises(ValueError, match="checkpoint=.*or onnx="):
        quantize_checkpoint(None, tmp_path)
    with pytest.raises(ValueError, match="calibration_images=0"):
        quantize_checkpoint(None, tmp_path, calibration_images=0)


def test_a_moved_dataset_is_found_by_rewriting_the_resolved_paths():
    cfg = OmegaConf.create({"dataset": {"root": "/old/coco", "val": {"ann_file": "/old/coco/ann/val.json",
                                                                     "image_dir": "/old/coco2/val", "size": 3},
                                        "train": {"root": ["/old/coco/a", "/elsewhere/b"]}}})
    moved = rebase_dataset_root(cfg, "/new")
    assert moved.dataset.root == "/new" and moved.dataset.val.ann_file == "/new/ann/val.json"
    assert moved.dataset.val.image_dir == "/old/coco2/val"  # only whole path components are replaced
    assert list(moved.dataset.train.root) == ["/new/a", "/elsewhere/b"] and moved.dataset.val.size == 3
    assert cfg.dataset.root == "/old/coco"  # the original is left alone
