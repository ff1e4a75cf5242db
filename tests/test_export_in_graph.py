"""Post-processing inside exported graphs (tasks/deploy/in_graph.py, onnx_nms.py) against the PyTorch head.

The reference is the head's own predict (heads/ssdlite/postprocess.py, itself checked against
torchvision's SSD postprocess in test_ssdlite_loss_postprocess.py) and torchvision's batched_nms.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import assert_same_detections
from onnx import TensorProto, helper

from heads.ssdlite.box_coder import BoxCoder
from heads.ssdlite.postprocess import postprocess
from tasks.deploy.in_graph import DetectionCandidates, detections_to_results, select_detections
from tasks.deploy.onnx_export import export_checkpoint
from tasks.deploy.onnx_nms import append_nms
from tasks.deploy.onnx_runtime import OnnxModel
from tasks.deploy.parity import compare_detections
from tasks.deploy.sidecar import read_sidecar
from tasks.evaluate import evaluate_checkpoint
from tasks.training.trained import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"box_coder_weights": [10.0, 10.0, 5.0, 5.0], "score_threshold": 0.05, "nms_iou_threshold": 0.5,
            "topk_candidates": 20, "detections_per_image": 15}


def _raw_outputs(batch: int, anchors: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Crowded random SSD outputs: anchors on a small grid, so many candidate boxes overlap."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(anchors, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(anchors, 2, generator=g) * 0.3 + 0.05
    return {"cls_logits": torch.randn(batch, anchors, classes + 1, generator=g) * 2,
            "bbox_regression": torch.randn(batch, anchors, 4, generator=g),
            "anchors": torch.cat([centres, sizes], 1)}


class _RawModel(torch.nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, images):
        return self.outputs


def _head_results(outputs, sizes):
    return postprocess(outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"], sizes,
                       BoxCoder(tuple(SETTINGS["box_coder_weights"])), SETTINGS["score_threshold"],
                       SETTINGS["topk_candidates"], SETTINGS["nms_iou_threshold"], SETTINGS["detections_per_image"])


def test_candidates_then_select_equal_the_heads_postprocess():
    outputs = _raw_outputs(3, 200, 4, seed=0)
    boxes, scores = DetectionCandidates(_RawModel(outputs), SETTINGS)(torch.zeros(1))
    sizes = [(64, 64), (120, 90), (48, 200)]
    got = detections_to_results(select_detections(boxes, scores, SETTINGS), sizes)
    expected = _head_results(outputs, sizes)
    figures = compare_detections(got, expected)
    assert sum(figures["detections"]) > 10 and figures["count_mismatches"] == figures["unmatched"] == 0
    assert figures["max_score_diff"] == 0 and figures["max_box_diff_px"] < 1e-4


def _nms_only_graph(batch_classes_k):
    """An ONNX graph whose outputs are its candidate inputs, with the NMS appended."""
    _, classes, k = batch_classes_k
    nodes = [helper.make_node("Identity", ["boxes_in"], ["candidate_boxes"]),
             helper.make_node("Identity", ["scores_in"], ["candidate_scores"])]
    graph = helper.make_graph(nodes, "candidates", [
        helper.make_tensor_value_info("boxes_in", TensorProto.FLOAT, ["batch", classes, k, 4]),
        helper.make_tensor_value_info("scores_in", TensorProto.FLOAT, ["batch", classes, k])], [
        helper.make_tensor_value_info("candidate_boxes", TensorProto.FLOAT, ["batch", classes, k, 4]),
        helper.make_tensor_value_info("candidate_scores", TensorProto.FLOAT, ["batch", classes, k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return append_nms(model, SETTINGS, classes, k)


def test_onnx_nonmaxsuppression_graph_equals_torchvision_batched_nms():
    outputs = _raw_outputs(4, 300, 6, seed=1)
    boxes, scores = DetectionCandidates(_RawModel(outputs), SETTINGS)(torch.zeros(1))
    model = _nms_only_graph(tuple(scores.shape))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = ["boxes", "scores", "labels", "num_detections"]
    got = dict(zip(names, session.run(names, {"boxes_in": boxes.numpy(), "scores_in": scores.numpy()})))
    expected = select_detections(boxes, scores, SETTINGS)
    assert got["boxes"].shape == (4, SETTINGS["detections_per_image"], 4)
    np.testing.assert_array_equal(got["num_detections"], expected["num_detections"].numpy())
    assert int(expected["num_detections"].min()) > 0
    np.testing.assert_array_equal(got["labels"], expected["labels"].numpy())
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), atol=1e-7)
    np.testing.assert_allclose(got["boxes"], expected["boxes"].numpy(), atol=1e-7)
    # padding rows: score 0, label -1, zero box
    n = int(got["num_detections"].min())
    if n < SETTINGS["detections_per_image"]:
        row = int(np.argmin(got["num_detections"]))
        assert (got["labels"][row, n:] == -1).all() and (got["scores"][row, n:] == 0).all()


@pytest.fixture(scope="module")
def in_graph_exports(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("in_graph")
    return {task: export_checkpoint(artifacts[task]["checkpoint"], root / f"{task}.onnx", nms_in_graph=True)
            for task in ("detection", "segmentation")}


def test_onnx_detections_in_graph_equal_the_pytorch_heads(artifacts, in_graph_exports):
    meta = read_sidecar(in_graph_exports["detection"])
    assert meta["output_names"] == ["boxes", "scores", "labels", "num_detections"] and meta["postprocess_in_graph"]
    assert meta["output_shapes"]["boxes"] == ["batch", 100, 4] and meta["parity"]["unmatched"] == 0
    model, _ = load_trained_model(artifacts["detection"]["checkpoint"])
    runner = OnnxModel(in_graph_exports["detection"], threads=1)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    sizes = [(64, 64), (120, 90), (48, 200)]
    with torch.no_grad():
        expected = model.predict(model(x), sizes)
    got = runner.predict(runner(x), sizes)
    assert_same_detections(expected, got)


def test_onnx_label_map_in_graph_equals_the_pytorch_heads(artifacts, in_graph_exports):
    graph = onnx.load(in_graph_exports["segmentation"]).graph
    assert [o.name for o in graph.output] == ["labels"]
    model, _ = load_trained_model(artifacts["segmentation"]["checkpoint"])
    runner = OnnxModel(in_graph_exports["segmentation"], threads=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model.head.predict(model(x), [(64, 64)] * 2, input_size=(64, 64), valid_sizes=[(64, 64)] * 2)
    got = runner.predict(runner(x), [(64, 64)] * 2, input_size=(64, 64), valid_sizes=[(64, 64)] * 2)
    for e, g in zip(expected, got):
        assert torch.equal(g["mask"], e["mask"])


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_evaluate_measures_the_deployed_file_with_the_same_evaluator(task, artifacts, in_graph_exports, tmp_path):
    reference = evaluate_checkpoint(artifacts[task]["checkpoint"], tmp_path / "pt", num_workers=0, progress=False)
    for artifact in (artifacts[task]["onnx"], in_graph_exports[task]):
        got = evaluate_checkpoint(None, tmp_path / "ort", num_workers=0, progress=False, runtime="onnxruntime",
                                  artifact=artifact, threads=1)
        assert set(got) == set(reference)
        for name, value in reference.items():
            assert got[name] == pytest.approx(value, abs=1e-6), name
