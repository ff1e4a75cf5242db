"""Class-wise NMS and the final top-k appended to an ONNX graph that ends in SSDLite's candidates.

The graph from tasks.deploy.in_graph.DetectionCandidates gives `candidate_boxes` [B, K, k, 4] and
`candidate_scores` [B, K, k]. Each (image, class) pair becomes one batch entry of ONNX's standard
NonMaxSuppression op (no coordinate-offset trick, so no precision lost on large offsets), with the
head's score threshold (strictly above) and IoU threshold. The kept scores are scattered back into a
[B, K * k] grid (-1 elsewhere), whose `detections_per_image` best per image are the detections:
`boxes` [B, D, 4] (normalised xyxy), `scores` [B, D], `labels` [B, D] (0..K-1; -1 on padding rows),
`num_detections` [B] (padding rows have score 0 and a zero box).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tasks.deploy.in_graph import CANDIDATE_OUTPUTS, DETECTION_OUTPUTS, max_detections


def _const(name: str, value: Any, dtype: Any) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype),
                                                                                    name))


def append_nms(model: onnx.ModelProto, settings: Mapping[str, Any], num_classes: int, k: int) -> onnx.ModelProto:
    """Replace the candidate outputs of `model` by the fixed-size detections (see the module docstring)."""
    graph = model.graph
    names = [o.name for o in graph.output]
    if names[:2] != list(CANDIDATE_OUTPUTS):
        raise ValueError(f"append_nms needs a graph whose outputs start with {list(CANDIDATE_OUTPUTS)}; got {names}.")
    limit = max_detections(settings, num_classes, k)
    threshold, iou = float(settings["score_threshold"]), float(settings["nms_iou_threshold"])
    boxes_in, scores_in = CANDIDATE_OUTPUTS
    p = "nms/"  # prefix: no clash with the exporter's names
    nodes = [
        _const(p + "boxes_shape", [-1, k, 4], np.int64),
        _const(p + "scores_shape", [-1, 1, k], np.int64),
        _const(p + "grid_shape", [-1, k], np.int64),
        _const(p + "image_shape", [-1, num_classes * k], np.int64),
        _const(p + "image_boxes_shape", [-1, num_classes * k, 4], np.int64),
        _const(p + "max_out", [min(k, limit)], np.int64),
        _const(p + "iou", [iou], np.float32),
        _const(p + "threshold", [threshold], np.float32),
        _const(p + "limit", [limit], np.int64),
        _const(p + "pair_columns", [0, 2], np.int64),
        _const(p + "k", k, np.int64),
        _const(p + "zero", 0.0, np.float32),
        _const(p + "no_label", -1, np.int64),
        _const(p + "axis2", [2], np.int64),
        _const(p + "axis1", [1], np.int64),
        helper.make_node("Reshape", [boxes_in, p + "boxes_shape"], [p + "boxes"]),
        helper.make_node("Reshape", [scores_in, p + "scores_shape"], [p + "scores"]),
        helper.make_node("NonMaxSuppression", [p + "boxes", p + "scores", p + "max_out", p + "iou", p + "threshold"],
                         [p + "selected"], center_point_box=0),
        # selected rows are (pair index, 0, candidate index): keep columns 0 and 2
        helper.make_node("Gather", [p + "selected", p + "pair_columns"], [p + "pairs"], axis=1),
        helper.make_node("Reshape", [scores_in, p + "grid_shape"], [p + "grid"]),
        helper.make_node("GatherND", [p + "grid", p + "pairs"], [p + "kept_scores"]),
        helper.make_node("Shape", [p + "grid"], [p + "grid_dims"]),
        helper.make_node("ConstantOfShape", [p + "grid_dims"], [p + "empty"],
                         value=numpy_helper.from_array(np.array([-1.0], np.float32))),
        helper.make_node("ScatterND", [p + "empty", p + "pairs", p + "kept_scores"], [p + "kept_grid"]),
        helper.make_node("Reshape", [p + "kept_grid", p + "image_shape"], [p + "per_image"]),
        helper.make_node("TopK", [p + "per_image", p + "limit"], [p + "top_scores", p + "top_index"], axis=1,
                         largest=1, sorted=1),
        helper.make_node("Div", [p + "top_index", p + "k"], [p + "top_labels"]),
        helper.make_node("Reshape", [boxes_in, p + "image_boxes_shape"], [p + "image_boxes"]),
        helper.make_node("Unsqueeze", [p + "top_index", p + "axis2"], [p + "top_index3"]),
        helper.make_node("GatherND", [p + "image_boxes", p + "top_index3"], [p + "top_boxes"], batch_dims=1),
        helper.make_node("Greater", [p + "top_scores", p + "threshold"], [p + "valid"]),
        helper.make_node("Unsqueeze", [p + "valid", p + "axis2"], [p + "valid3"]),
        helper.make_node("Where", [p + "valid3", p + "top_boxes", p + "zero"], ["boxes"]),
        helper.make_node("Where", [p + "valid", p + "top_scores", p + "zero"], ["scores"]),
        helper.make_node("Where", [p + "valid", p + "top_labels", p + "no_label"], ["labels"]),
        helper.make_node("Cast", [p + "valid"], [p + "valid_int"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", [p + "valid_int", p + "axis1"], ["num_detections"], keepdims=0),
    ]
    graph.node.extend(nodes)
    for out in [o for o in graph.output if o.name in CANDIDATE_OUTPUTS]:
        graph.output.remove(out)
    graph.output.extend([
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", limit, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", limit]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", limit]),
        helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["batch"]),
    ])
    # keep the outputs in DETECTION_OUTPUTS order, after any others
    order = {name: i for i, name in enumerate(DETECTION_OUTPUTS)}
    outputs = sorted(graph.output, key=lambda o: order.get(o.name, -1))
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(model)
    return model


__all__ = ["append_nms"]
