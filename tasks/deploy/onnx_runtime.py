"""Running an exported model in ONNX Runtime with the PyTorch model's surface.

`OnnxModel(path)(images)` gives the same outputs dict as `model(images)` (torch tensors, CPU), and
`OnnxModel.predict(outputs, image_sizes)` the same results as the head's `predict`, so prediction and
evaluation (tasks.training.evaluation.evaluate) take either runtime.

Post-processing of the raw SSDLite outputs (documented here because the graph stops before it):
1. boxes = decode(bbox_regression, anchors): anchors are normalised (cx, cy, w, h); a code
   (dx, dy, dw, dh) gives cx = dx / 10 * w_a + cx_a, cy = dy / 10 * h_a + cy_a, w = exp(dw / 5) * w_a,
   h = exp(dh / 5) * h_a (weights = sidecar postprocess.box_coder_weights; exp's input is clamped at
   log(1000 / 16)), then xyxy, scaled by the image's (w, h) and clipped to it;
2. scores = softmax(cls_logits)[..., 1:] (column 0 is background);
3. per class, the `topk_candidates` best anchors, kept when score > `score_threshold`;
4. at most `nms_pre` of those, the best over all classes (absent or null: no cap);
5. class-wise NMS at `nms_iou_threshold`, then the `detections_per_image` best per image.
`decode_detections` runs exactly this with the head's own code (heads.ssdlite.postprocess).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from heads.deeplabv3 import logits_to_label_maps
from heads.ssdlite.box_coder import BoxCoder
from heads.ssdlite.postprocess import postprocess
from tasks.deploy.sidecar import read_sidecar

ArrayLike = torch.Tensor | np.ndarray


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def decode_detections(outputs: Mapping[str, ArrayLike], image_sizes: Sequence[tuple[int, int]],
                      settings: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Raw SSDLite outputs (numpy or torch) -> per image {"boxes" xyxy pixels of (h, w), "scores",
    "labels" 0..K-1}; `settings` is the sidecar's "postprocess" entry."""
    return postprocess(_tensor(outputs["cls_logits"]), _tensor(outputs["bbox_regression"]),
                       _tensor(outputs["anchors"]), image_sizes,
                       BoxCoder(tuple(settings["box_coder_weights"])), float(settings["score_threshold"]),
                       int(settings["topk_candidates"]), float(settings["nms_iou_threshold"]),
                       int(settings["detections_per_image"]), settings.get("nms_pre"))


def decode_segmentation(logits: ArrayLike, image_sizes: Sequence[Sequence[int]],
                        input_size: Sequence[int] | None = None,
                        valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Raw DeepLab logits (numpy or torch) -> per image {"mask"}, exactly as the PyTorch head decodes them."""
    return logits_to_label_maps(_tensor(logits), image_sizes, input_size, valid_sizes)


class OnnxModel:
    """An exported .onnx and its sidecar, run by ONNX Runtime on the CPU (or `providers`)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 metadata: Mapping[str, Any] | None = None, spinning: bool = False):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist.")
        self.metadata = dict(metadata) if metadata is not None else read_sidecar(self.path)
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

    @property
    def task(self) -> str:
        return self.metadata["task"]

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.metadata["input_size"]
        return int(h), int(w)

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    def eval(self) -> OnnxModel:
        return self

    def to(self, device: Any) -> OnnxModel:
        return self

    def run(self, images: ArrayLike) -> dict[str, np.ndarray]:
        """images [B, 3, H, W] float32 at the input size -> {output name: numpy array}."""
        x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path.name} takes images [batch, 3, {self.input_size[0]}, "
                             f"{self.input_size[1]}]; got shape {tuple(x.shape)}.")
        x = np.ascontiguousarray(x, dtype=np.float32)
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: x})))

    def __call__(self, images: ArrayLike) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(value) for name, value in self.run(images).items()}

    def predict(self, outputs: Mapping[str, ArrayLike], image_sizes: Sequence[Sequence[int]],
                input_size: Sequence[int] | None = None,
                valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        if self.task == "detection":
            return decode_detections(outputs, [tuple(int(v) for v in s) for s in image_sizes],
                                     self.metadata["postprocess"])
        return decode_segmentation(outputs["logits"], image_sizes, input_size, valid_sizes)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, task={self.task}, input_size={self.input_size})"


__all__ = ["OnnxModel", "decode_detections", "decode_segmentation"]
