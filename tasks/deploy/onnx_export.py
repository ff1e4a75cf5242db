"""Export a trained checkpoint to ONNX: the graph, its checks, and `export_checkpoint` behind `python -m tasks.export`.

BatchNorm is folded into the convolutions first (tasks/deploy/fold_bn.py). The graph takes `images`
[batch, 3, H, W] (float32, RGB, normalised with the sidecar's mean/std; batch is dynamic, H and W are
the training input size) and returns the model's raw outputs:
- SSDLite: `cls_logits` [batch, A, K+1] (index 0 = background), `bbox_regression` [batch, A, 4] and
  `anchors` [A, 4] (normalised cx, cy, w, h; a constant of the graph), then (`decode_in_graph`, the default)
  the dense part of the decoding, which ONNX Runtime's kernels do far cheaper than Python after the call:
  `class_scores` [batch, A, K] = softmax(cls_logits)[..., 1:], `best_class_score` [batch, A] (their maximum
  per anchor) and `anchor_boxes` [batch, A, 4] (every anchor's box decoded, normalised xyxy, unclipped).
  Candidate selection + class-wise NMS is `tasks.deploy.onnx_runtime.decode_detections`, which runs the head's
  own post-processing, from those outputs when the graph gives them (the sidecar's `decode_in_graph`), else
  from the raw ones; the detections are the same.
- DeepLabv3: `logits` [batch, K, H/s, W/s], or at the input size with `upsample_logits=true`.
Beside `model.onnx` goes `model.json` (the sidecar): task, input size, mean/std, class names, the
COCO category ids, decoding settings, the exporter used, measured parity and the training config
(which the runners use to rebuild the exact val preprocessing).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from heads.ssdlite.box_coder import BoxCoder
from heads.ssdlite.postprocess import foreground_scores
from tasks.deploy.fold_bn import fold_batchnorm
from tasks.deploy.in_graph import (
    CANDIDATE_OUTPUTS,
    DECODED_OUTPUTS,
    DETECTION_OUTPUTS,
    in_graph_wrapper,
    max_detections,
)
from tasks.deploy.parity import check_in_graph_parity
from tasks.deploy.sidecar import INPUT_NAME, model_metadata, refuse_to_overwrite, sidecar_path, write_json
from tasks.errors import ConfigError
from tasks.training.trained import load_trained_model

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class ExportWrapper(nn.Module):
    """`forward(images)` -> a tuple of the model's outputs in `output_names` order (ONNX wants tensors,
    not a dict); with `upsample_logits`, segmentation logits come out at the input size; DECODED_OUTPUTS among
    the names: SSDLite's decoded outputs, computed with `box_coder` (the sidecar's weights)."""

    def __init__(self, model: nn.Module, output_names: Sequence[str], upsample_logits: bool = False,
                 box_coder: BoxCoder | None = None):
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)
        self.upsample_logits = upsample_logits
        self.box_coder = box_coder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = dict(self.model(images))
        if self.upsample_logits and "logits" in outputs:
            outputs["logits"] = F.interpolate(outputs["logits"], size=images.shape[-2:], mode="bilinear",
                                              align_corners=False)
        if DECODED_OUTPUTS[0] in self.output_names:
            scores = foreground_scores(outputs["cls_logits"])
            boxes = self.box_coder.decode(outputs["bbox_regression"], outputs["anchors"])
            outputs |= dict(zip(DECODED_OUTPUTS, (scores, scores.amax(dim=-1), boxes)))
        return tuple(outputs[name] for name in self.output_names)


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx's dynamo exporter prints its progress, and onnxscript/onnx_ir log every pass at INFO
    (Hydra shows INFO) and benign notices at WARNING: keep them out of the user's console (the printed
    progress goes to the log at debug level); errors still surface as exceptions."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "onnxruntime")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            # The legacy exporter warns that the anchors become constants: they are constants by design.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if buffer.getvalue().strip():
            log.debug("exporter output:\n%s", buffer.getvalue())


def _batched(name: str, tensor: torch.Tensor, batch: int) -> bool:
    """Whether an output has the batch axis first (anchors do not)."""
    return name != "anchors" and tensor.dim() > 0 and tensor.shape[0] == batch


def export_model(model: nn.Module, cfg: DictConfig, path: str | Path, opset: int = DEFAULT_OPSET,
                 dynamo: bool = True, upsample_logits: bool = False, check: bool = True,
                 check_tolerance: float = 1e-3, source: str | None = None, nms_in_graph: bool = False,
                 decode_in_graph: bool = True) -> Path:
    """Fold BN, export `model` to `path` (one self-contained .onnx file) and write the sidecar beside it.

    With `check`, ONNX Runtime runs the file on a random batch of 2 and a batch of 1; the largest
    absolute difference to PyTorch (the unfolded model) goes into the sidecar, and a difference above
    `check_tolerance` is an error. With `nms_in_graph`, the graph ends in the post-processing
    (tasks/deploy/in_graph.py, tasks/deploy/onnx_nms.py) and the check compares final detections / label maps;
    otherwise, with `decode_in_graph`, an SSDLite graph also gives DECODED_OUTPUTS (the module's docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = model_metadata(cfg)
    height, width = meta["input_size"]
    model = model.cpu().eval()
    folded = fold_batchnorm(model)
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = dict(model(example))
    names = list(reference)
    decode_in_graph = bool(decode_in_graph and not nms_in_graph and "cls_logits" in reference)
    box_coder = BoxCoder(tuple(meta["postprocess"]["box_coder_weights"])) if decode_in_graph else None
    if decode_in_graph:
        names += DECODED_OUTPUTS
        with torch.no_grad():
            reference = dict(zip(names, ExportWrapper(model, names, box_coder=box_coder).eval()(example)))
    wrapper = ExportWrapper(folded, names, upsample_logits, box_coder).eval()
    if nms_in_graph:
        wrapper, names = in_graph_wrapper(folded, meta)
        reference = dict(zip(names, wrapper(example)))
    with torch.no_grad():
        shapes = {n: list(t.shape) for n, t in zip(names, wrapper(example))}
    batched = {n for n in names if _batched(n, reference[n], example.shape[0])}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # path itself appears only once the export passed its check
    try:
        try:
            with quiet_exporter():
                if dynamo:
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    torch.onnx.export(wrapper, (example,), tmp, input_names=[INPUT_NAME], output_names=names,
                                      opset_version=opset, dynamo=True, external_data=False, verbose=False,
                                      dynamic_shapes={INPUT_NAME: {0: batch}}, optimize=True)
                else:
                    axes = {INPUT_NAME: {0: "batch"}} | {n: {0: "batch"} for n in batched}
                    torch.onnx.export(wrapper, (example,), tmp, input_names=[INPUT_NAME], output_names=names,
                                      opset_version=opset, dynamo=False, dynamic_axes=axes,
                                      do_constant_folding=True)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            other = "dynamo=false (the TorchScript exporter)" if dynamo else "dynamo=true"
            raise RuntimeError(f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'}, opset {opset}) "
                               f"failed: {first}; try {other} or another opset.") from err
        if nms_in_graph and meta["task"] == "detection":
            import onnx

            from tasks.deploy.onnx_nms import append_nms

            _, num_classes, k = shapes[CANDIDATE_OUTPUTS[1]]
            onnx.save(append_nms(onnx.load(tmp), meta["postprocess"], num_classes, k), tmp)
            names = list(DETECTION_OUTPUTS)
            shapes = {"boxes": [2, max_detections(meta["postprocess"], num_classes, k), 4]}
            shapes |= {"scores": shapes["boxes"][:2], "labels": shapes["boxes"][:2], "num_detections": [2]}
            batched = set(names)
        meta |= {
            "output_names": names,
            "output_shapes": {n: (["batch", *s[1:]] if n in batched else s) for n, s in shapes.items()},
            "logits_upsampled": bool(upsample_logits) if meta["task"] == "segmentation" else None,
            "exporter": {"torch": torch.__version__, "dynamo": bool(dynamo), "opset": int(opset)},
            "batchnorms_folded": int(folded.folded_batchnorms),
            "source_checkpoint": source,
            "train_config": OmegaConf.to_container(cfg, resolve=True),
            "postprocess_in_graph": bool(nms_in_graph),
            "decode_in_graph": decode_in_graph,
        }
        if check and nms_in_graph:
            meta["parity"] = check_in_graph_parity(_ort_runner(tmp), model, meta, example)
        elif check:  # against the original, unfolded model
            unfolded = ExportWrapper(model, names, upsample_logits, box_coder).eval()
            meta["parity"] = check_parity(tmp, unfolded, names, example, check_tolerance)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(meta, sidecar_path(path))
    return path


def _ort_runner(path: Path):
    """images (numpy) -> {output name: numpy} through one ONNX Runtime session on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {INPUT_NAME: images})))


def check_parity(path: Path, wrapper: nn.Module, names: Sequence[str], example: torch.Tensor,
                 tolerance: float) -> dict[str, Any]:
    """Largest |ONNX Runtime - PyTorch| per output at batch 2 and 1 (the batch axis is dynamic)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("check=true runs the export in ONNX Runtime, which is not installed; install "
                          "mobilevision[deploy] or pass check=false.") from None

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a small check; more threads only contend on a busy machine
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}
    for images in (example, example[:1]):
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(images)]
        got = session.run(list(names), {INPUT_NAME: images.numpy()})
        for name, a, b in zip(names, got, expected):
            if a.shape != b.shape:
                raise RuntimeError(f"the exported model gives {name} of shape {a.shape} for a batch of "
                                   f"{images.shape[0]}, PyTorch {b.shape}.")
            worst[name] = max(worst.get(name, 0.0), float(np.abs(a - b).max()) if a.size else 0.0)
    if max(worst.values()) > tolerance:
        raise RuntimeError(f"the exported model differs from PyTorch by {worst} (max abs), more than "
                           f"check_tolerance={tolerance}.")
    return {"batches": [int(example.shape[0]), 1], "max_abs_diff": worst}


def export_checkpoint(checkpoint: str | Path, output: str | Path, opset: int = DEFAULT_OPSET, dynamo: bool = True,
                      upsample_logits: bool = False, check: bool = True, nms_in_graph: bool = False,
                      trusted: Sequence[str] = (), overwrite: bool = False) -> Path:
    """`checkpoint` -> `output` (.onnx) + its sidecar; returns the .onnx path."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ConfigError(f"output={output} must end in .onnx.")
    refuse_to_overwrite([output, sidecar_path(output)], overwrite)
    model, cfg = load_trained_model(checkpoint, trusted=trusted)
    return export_model(model, cfg, output, opset, dynamo, upsample_logits, check, source=str(checkpoint),
                        nms_in_graph=nms_in_graph)

