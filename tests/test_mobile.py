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
    # int8 of an almost untrained network (raw outputs within ~0.05 of 0): bounds that catch a broken graph
    # (litert-torch's unobserved concatenations clipped the SSDLite outputs: 0.9 off; XNNPACK's int8 label-map
    # upsample: 18 % of pixels), not the accuracy, which `make bench-mobile` measures on the val split.
    assert max(parity["raw_relative_diff"].values()) < 0.25, parity
    if task == "segmentation":
        assert parity["pixel_agreement"] > 0.9, parity
    else:
        assert parity["count_mismatches"] == 0 and parity["matched_share"] > 0.9, parity


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


def test_litert_topk_runs_in_the_interpreter_and_equals_pytorch(tmp_path):
    """litert-torch lowers torch.topk to STABLEHLO_SORT, which the interpreter cannot load unless k is the whole
    axis (SSDLite @ 320: 300 of 3234 anchors, nms_pre 1000 of 80 x 300); the decoder converts with TOPK_V2."""
    _require("tflite")
    from ai_edge_litert.interpreter import Interpreter

    from tasks.deploy.in_graph import CandidateDecoder
    from tasks.deploy.litert import convert_litert

    settings = {"box_coder_weights": [10.0, 10.0, 5.0, 5.0], "score_threshold": 0.01, "nms_iou_threshold": 0.5,
                "topk_candidates": 5, "detections_per_image": 10, "nms_pre": 7}

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.post = CandidateDecoder(settings)
            self.anchors = torch.nn.Buffer(torch.rand(30, 4).sort(dim=1).values)  # x1 < x2, y1 < y2

        def forward(self, logits):
            return self.post(logits, torch.zeros(1, 30, 4), self.anchors)

    torch.manual_seed(0)
    graph, logits = Decode().eval(), torch.randn(1, 30, 4)
    path = convert_litert(graph, logits, tmp_path / "decode.tflite")
    assert graph.post.topk.__name__ == "last_dim_topk"  # restored after the conversion
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    assert "TOPK_V2" in {op["op_name"] for op in interpreter._get_ops_details()}
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], logits.numpy())
    interpreter.invoke()
    signature = interpreter._get_full_signature_list()["serving_default"]["outputs"]
    boxes, scores = (interpreter.get_tensor(signature[f"output_{i}"]) for i in range(2))
    with torch.no_grad():
        expected_boxes, expected_scores = graph(logits)
    assert (expected_scores > 0).sum() == settings["nms_pre"]  # the nms_pre cut is exercised
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-6)
    np.testing.assert_allclose(boxes, expected_boxes.numpy(), atol=1e-6)


def test_litert_quantizer_observes_relu6_and_the_head_concatenations_not_the_anchors(artifacts):
    """litert-torch's own annotators miss aten.cat / aten.add under torch >= 2.10 (they match function objects
    against the names torch.export records) and observe ReLU6 through its conv; ours observes the
    image-dependent adds / concatenations outside the decoding and each ReLU6 after its clamp."""
    _require("tflite")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from tasks.deploy.fold_bn import fold_batchnorm
    from tasks.deploy.in_graph import FLOAT_MODULES, from_modules
    from tasks.deploy.mobile_export import MobileGraph
    from tasks.deploy.pt2e_quantizers import CONVOLUTIONS, RELU6, image_dependent_nodes, litert_quantizer
    from tasks.deploy.sidecar import model_metadata
    from tasks.training.trained import load_trained_model

    model, cfg = load_trained_model(artifacts["detection"]["checkpoint"])
    graph = MobileGraph(fold_batchnorm(model.eval()), model_metadata(cfg)).eval()
    exported_graph = torch.export.export(graph, (torch.randn(1, 3, 64, 64),)).module()
    quantizer = litert_quantizer(FLOAT_MODULES)
    prepared = prepare_pt2e(exported_graph, quantizer)
    dependent = image_dependent_nodes(prepared.graph)
    cats = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.cat.default]
    observed = [n for n in cats if all("activation_post_process" in str(a.target) for a in n.args[0])]
    head_outputs = [n for n in cats if n in dependent]
    assert len(head_outputs) == 2 and set(observed) == set(head_outputs)  # cls_logits, bbox_regression
    assert any(n not in dependent for n in cats)  # the anchors' concatenations: constants, left alone
    adds = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.add.Tensor and n in dependent
            and all(a in dependent for a in n.args[:2]) and not from_modules(n)]  # the residual adds
    assert adds and all(any("activation_post_process" in str(u.target) for u in n.users) for n in adds)
    # every ReLU6 is observed after its clamp, not through its conv's observer (which would see < 0 and > 6)
    relu6 = [n for n in prepared.graph.nodes if n.target in RELU6]
    assert relu6 and all(n.args[0].target in CONVOLUTIONS for n in relu6)  # no observer in between
    assert all(any("activation_post_process" in str(u.target) for u in n.users) for n in relu6)


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
