"""Running an exported model in ONNX Runtime with the PyTorch model's surface.

`OnnxModel(path)(images)` gives the same outputs dict as `model(images)` (torch tensors, CPU), and
`OnnxModel.predict(outputs, image_sizes)` the same results as the head's `predict` (tasks/deploy/runner.py,
shared with the other runtimes), so prediction and evaluation (tasks.training.evaluation.evaluate) take
either runtime.

Post-processing of the raw SSDLite outputs (documented here because the graph stops before it):
1. boxes = decode(bbox_regression, anchors): anchors are normalised (cx, cy, w, h); a code
   (dx, dy, dw, dh) gives cx = dx / 10 * w_a + cx_a, cy = dy / 10 * h_a + cy_a, w = exp(dw / 5) * w_a,
   h = exp(dh / 5) * h_a (weights = sidecar postprocess.box_coder_weights; exp's input is clamped at
   log(1000 / 16)), then xyxy, scaled by the image's (w, h) and clipped to it;
2. scores = softmax(cls_logits)[..., 1:] (column 0 is background);
   a graph exported with decode_in_graph (the default; the sidecar's `decode_in_graph`) already gives
   the scores (`class_scores`), each anchor's best score (`best_class_score`) and each anchor's decoded
   box before scaling (`anchor_boxes`), and decode_detections starts from those;
3. per class, the `topk_candidates` best anchors, kept when score > `score_threshold`;
4. at most `nms_pre` of those, the best over all classes (absent or null: no cap);
5. class-wise NMS at `nms_iou_threshold`, then the `detections_per_image` best per image.
`decode_detections` runs exactly this with the head's own code (heads.ssdlite.postprocess). An export with
nms_in_graph=true runs steps 1-5 inside the graph (tasks/deploy/in_graph.py, tasks/deploy/onnx_nms.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.deploy.runner import DeployedModel, decode_detections, decode_segmentation


class OnnxModel(DeployedModel):
    """An exported .onnx and its sidecar, run by ONNX Runtime on the CPU (or `providers`)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 metadata: Mapping[str, Any] | None = None, spinning: bool = False):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist.")
        super().__init__(path, metadata)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # ONNX Runtime's idle threads otherwise spin for a while after each call, taking the cores from the
        # PyTorch decoding and NMS that run right after it (benchmarks/README.md, deploy: measured there).
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: images})))


__all__ = ["OnnxModel", "decode_detections", "decode_segmentation"]
