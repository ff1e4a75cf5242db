"""The PyTorch model's surface over a deployed file, whatever runs it.

`DeployedModel(path)(images)` gives an outputs dict (torch tensors, CPU) and `.predict(outputs, image_sizes)`
the same per-image results as the head's `predict`, so tasks.predict and the evaluation loop
(tasks.training.evaluation.evaluate) take any runtime. A subclass only says how to run the file
(`_run`: numpy images -> numpy outputs); `load_deployed(path, runtime)` picks the subclass by the
runtime the user named. The outputs it decodes, by what the graph ends in:
- raw head outputs (`cls_logits`/`bbox_regression`/`anchors`, or `logits`): the head's own decoding, from
  `class_scores`/`best_class_score`/`anchor_boxes` when the graph also gives them (decode_in_graph);
- `candidate_boxes`/`candidate_scores` (decoding and top-k inside, NMS outside): in_graph.select_detections;
- `boxes`/`scores`/`labels`/`num_detections` (all inside), or a `labels` map at the input size.
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
from tasks.deploy.in_graph import DECODED_OUTPUTS, detections_to_results, label_maps_to_results, select_detections
from tasks.deploy.sidecar import read_sidecar
from tasks.errors import ConfigError

ArrayLike = torch.Tensor | np.ndarray
RUNTIMES = {  # runtime name -> "module:class"; chosen by the user's runtime=..., never by a file
    "onnxruntime": "tasks.deploy.onnx_runtime:OnnxModel",
    "litert": "tasks.deploy.litert:LiteRTModel",
    "executorch": "tasks.deploy.executorch:ExecuTorchModel",
}


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def decode_detections(outputs: Mapping[str, ArrayLike], image_sizes: Sequence[tuple[int, int]],
                      settings: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Raw SSDLite outputs (numpy or torch) -> per image {"boxes" xyxy pixels of (h, w), "scores",
    "labels" 0..K-1}; `settings` is the sidecar's "postprocess" entry. Outputs that also hold `class_scores`,
    `best_class_score` and `anchor_boxes` (a graph exported with decode_in_graph) are decoded from those: the
    same detections, without the dense softmax and box decoding after the call."""
    decoded = {name: _tensor(outputs[name]) for name in DECODED_OUTPUTS if name in outputs}
    return postprocess(None if "class_scores" in decoded else _tensor(outputs["cls_logits"]),
                       _tensor(outputs["bbox_regression"]), _tensor(outputs["anchors"]), image_sizes,
                       BoxCoder(tuple(settings["box_coder_weights"])), float(settings["score_threshold"]),
                       int(settings["topk_candidates"]), float(settings["nms_iou_threshold"]),
                       int(settings["detections_per_image"]), settings.get("nms_pre"), **decoded)


def decode_segmentation(logits: ArrayLike, image_sizes: Sequence[Sequence[int]],
                        input_size: Sequence[int] | None = None,
                        valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Raw DeepLab logits (numpy or torch) -> per image {"mask"}, exactly as the PyTorch head decodes them."""
    return logits_to_label_maps(_tensor(logits), image_sizes, input_size, valid_sizes)


class DeployedModel:
    """A deployed file and its sidecar. `batch`: the graph's fixed batch size (None = dynamic); a larger
    batch is run image by image."""

    batch: int | None = None

    def __init__(self, path: str | Path, metadata: Mapping[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} does not exist.")
        self.metadata = dict(metadata) if metadata is not None else read_sidecar(self.path)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

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

    def eval(self) -> DeployedModel:
        return self

    def to(self, device: Any) -> DeployedModel:
        return self

    def run(self, images: ArrayLike) -> dict[str, np.ndarray]:
        """images [B, 3, H, W] float32 at the input size -> {output name: numpy array}."""
        x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path.name} takes images [batch, 3, {self.input_size[0]}, "
                             f"{self.input_size[1]}]; got shape {tuple(x.shape)}.")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.batch is None or x.shape[0] == self.batch:
            return self._run(x)
        parts = [self._run(x[i:i + 1]) for i in range(x.shape[0])]
        # outputs without a batch axis (SSDLite's anchors) are the same for every image
        return {k: (np.concatenate([p[k] for p in parts]) if k != "anchors" else parts[0][k]) for k in parts[0]}

    def __call__(self, images: ArrayLike) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.asarray(value)) for name, value in self.run(images).items()}

    def predict(self, outputs: Mapping[str, ArrayLike], image_sizes: Sequence[Sequence[int]],
                input_size: Sequence[int] | None = None,
                valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        outputs = {k: _tensor(v) for k, v in outputs.items()}
        sizes = [tuple(int(v) for v in s) for s in image_sizes]
        if self.task == "detection":
            if "num_detections" in outputs:
                return detections_to_results(outputs, sizes)
            if "candidate_boxes" in outputs:
                selected = select_detections(outputs["candidate_boxes"], outputs["candidate_scores"],
                                             self.metadata["postprocess"])
                return detections_to_results(selected, sizes)
            return decode_detections(outputs, sizes, self.metadata["postprocess"])
        if "labels" in outputs:
            return label_maps_to_results(outputs["labels"], sizes, valid_sizes)
        return decode_segmentation(outputs["logits"], sizes, input_size, valid_sizes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, task={self.task}, input_size={self.input_size})"


def load_deployed(path: str | Path, runtime: str, threads: int | None = None) -> DeployedModel:
    """The runner of `runtime` (onnxruntime, litert, executorch) over `path` and its sidecar."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime} has no runner; expected one of {', '.join(RUNTIMES)}.")
    module, name = RUNTIMES[runtime].split(":")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        return cls(path, threads=threads)
    except ImportError as err:
        raise ConfigError(f"runtime={runtime} needs {err.name}, which is not installed; install "
                          f"mobilevision[mobile] (`make test-mobile` sets up .venv-mobile).") from None


__all__ = ["DeployedModel", "RUNTIMES", "decode_detections", "decode_segmentation", "load_deployed"]
