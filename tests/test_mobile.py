"""On-device exports (tasks/deploy/mobile_export.py) run in their own runtimes against the PyTorch model.

Marked `mobile`: they need mobilevision[mobile] (litert-torch + ai-edge-litert, executorch, coremltools);
`make test-mobile` installs it in .venv-mobile and runs them. Each format x precision is converted once per
session from the tiny checkpoints of conftest.build_deploy_artifacts, then checked on raw outputs (against
the unfolded PyTorch model), on final detections / label maps, and through tasks.evaluate's evaluator.
"""
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT

from tasks.deploy.parity import SCORE_TOLERANCE
from tasks.deploy.sidecar import read_sidecar
from tasks.evaluate import evaluate_checkpoint

pytestmark = [pytest.mark.mobile, pytest.mark.usefixtures("one_thread")]

NEEDS = {"tflite": ("litert_torch", "ai_edge_litert"), "executorch": ("executorch",), "coreml": ("coremltools",)}
RUNTIME = {"tflite": "litert", "executorch": "executorch"}
TASKS = ("detection", "segmentation")


def _require(fmt: str) -> None:
    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"format={fmt} needs {', '.join(missing)} (mobilevision[mobile]); `make test-mobile` installs it")


_EXPORTS: dict = {}


def exported(artifacts, tmp_path_factory, fmt: str, task: str, precision: str):
    """(path, sidecar) of one conversion, made once per session."""
    _require(fmt)
    key = (fmt, task, precision)
    if key not in _EXPORTS:
        from tasks.deploy.mobile_export import FORMATS, export_mobile

        out = tmp_path_factory.mktemp(f"{fmt}_{task}_{precision}") / f"model{FORMATS[fmt]}"
        try:
            path = export_mobile(artifacts[task]["checkpoint"], fmt, out, precision, num_calibration=8)
            _EXPORTS[key] = (path, read_sidecar(path))
        except Exception as err:  # noqa: BLE001 - recorded once, every test of this conversion reports it
            _EXPORTS[key] = err
    result = _EXPORTS[key]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_fp32_equals_pytorch_on_raw_outputs_and_results(fmt, task, artifacts, tmp_path_factory):
    path, meta = exported(artifacts, tmp_path_factory, fmt, task, "fp32")
    parity = meta["parity"]
    assert meta["precision"] == "fp32" and meta["class_names"] and meta["mean"] and meta["postprocess"]
    assert parity["images"] >= 1 and parity["raw_max_abs_diff"]
    assert max(parity["raw_max_abs_diff"].values()) < 1e-4, parity
    if task == "detection":
        assert sum(parity["detections"]) > 0
        assert parity["count_mismatches"] == 0 and parity["unmatched"] == 0, parity
        assert parity["max_score_diff"] <= SCORE_TOLERANCE and parity["max_box_diff_px"] < 1e-2, parity
    else:
        assert parity["pixel_agreement"] >= 0.999, parity


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_int8_is_quantized_and_close_to_pytorch(fmt, task, artifacts, tmp_path_factory):
    fp32_path, _ = exported(artifacts, tmp_path_factory, fmt, task, "fp32")
    path, meta = exported(artifacts, tmp_path_factory, fmt, task, "int8")
    assert meta["precision"] == "int8" and meta["calibration"]["images"] == 8
    assert path.stat().st_size < fp32_path.stat().st_size  # int8 weights: a quarter of the bytes, plus scales
    parity = meta["parity"]
    # int8 of an almost untrained network: loose bounds that catch a broken graph (wrong scales, a missing
    # dequantize), not the accuracy, which `make bench`'s deployment table measures on the val split.
    if fmt == "tflite" and task == "detection" and max(parity["raw_relative_diff"].values()) >= 0.5:
        pytest.xfail(f"known: litert-torch's int8 .tflite of SSDLite gives its raw outputs a non-negative range "
                     f"(negative logits / box codes clipped near 0) although the PT2E model it converts is within "
                     f"~1 % of PyTorch; parity {parity}")
    assert max(parity["raw_relative_diff"].values()) < 0.5, parity
    if task == "segmentation":
        if fmt == "executorch" and parity["pixel_agreement"] <= 0.5:
            pytest.xfail(f"known: ExecuTorch's int8 .pte gives logits within ~1 % of PyTorch but an in-graph label "
                         f"map (bilinear upsample + argmax, left in float) that disagrees; parity {parity}")
        assert parity["pixel_agreement"] > 0.5, parity


@pytest.mark.parametrize("fmt", ["tflite", "executorch"])
def test_evaluate_and_predict_take_the_deployed_file(fmt, artifacts, tmp_path_factory, tmp_path):
    task = "detection"
    path, _ = exported(artifacts, tmp_path_factory, fmt, task, "fp32")
    reference = evaluate_checkpoint(artifacts[task]["checkpoint"], tmp_path / "pt", num_workers=0, progress=False)
    got = evaluate_checkpoint(None, tmp_path / "dev", num_workers=0, progress=False, runtime=RUNTIME[fmt],
                              artifact=path, threads=1)
    assert set(got) == set(reference)
    for name, value in reference.items():
        assert math.isclose(got[name], value, abs_tol=1e-4), (name, got[name], value)
    images = f"{artifacts[task]['data']}/val2017"
    result = subprocess.run([sys.executable, "-m", "tasks.predict", f"runtime={RUNTIME[fmt]}", f"artifact={path}",
                             f"inputs=[{images}]", f"output_dir={tmp_path / 'pred'}", "threads=1", "batch_size=2",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "pred" / "results.json").is_file()


def test_litert_int8_runs_integer_kernels(artifacts, tmp_path_factory):
    from ai_edge_litert.interpreter import Interpreter

    path, _ = exported(artifacts, tmp_path_factory, "tflite", "detection", "int8")
    interpreter = Interpreter(model_path=str(path))
    ops = interpreter._get_ops_details()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    convs = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert convs and all(tensors[op["inputs"][1]]["dtype"] == np.int8 for op in convs)
    assert all(tensors[op["inputs"][0]]["dtype"] == np.int8 for op in convs)


def test_coreml_package_carries_classes_and_preprocessing(artifacts, tmp_path_factory):
    from tasks.deploy.coreml import prediction_unavailable_reason, read_metadata

    path, meta = exported(artifacts, tmp_path_factory, "coreml", "detection", "fp32")
    inside = read_metadata(path)
    assert inside["class_names"] == meta["class_names"] and inside["task"] == "detection"
    assert inside["mean"] == meta["mean"] and inside["std"] == meta["std"] and inside["input_size"] == [64, 64]
    assert inside["postprocess"] == meta["postprocess"]
    reason = prediction_unavailable_reason()
    if reason:
        pytest.skip(f"conversion and metadata checked; prediction skipped: {reason}")
    import coremltools as ct

    from tasks.training.trained import load_trained_model

    model, _ = load_trained_model(artifacts["detection"]["checkpoint"])
    x = torch.randn(1, 3, 64, 64)
    got = ct.models.MLModel(str(path)).predict({"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)["cls_logits"].numpy()
    assert np.abs(got["cls_logits"] - expected).max() < 1e-3
