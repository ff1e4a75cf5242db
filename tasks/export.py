"""Export a trained checkpoint to ONNX: `python -m tasks.export checkpoint=... [opset=18] [dynamo=true]`.

BatchNorm is folded into the convolutions first (tasks/fold_bn.py). The graph takes `images`
[batch, 3, H, W] (float32, RGB, normalised with the sidecar's mean/std; batch is dynamic, H and W are
the training input size) and returns the model's raw outputs:
- SSDLite: `cls_logits` [batch, A, K+1] (index 0 = background), `bbox_regression` [batch, A, 4] and
  `anchors` [A, 4] (normalised cx, cy, w, h; a constant of the graph). Decoding + class-wise NMS is
  `tasks.onnx_runtime.decode_detections`, which runs the head's own post-processing.
- DeepLabv3: `logits` [batch, K, H/s, W/s], or at the input size with `upsample_logits=true`.
Beside `model.onnx` goes `model.json` (the sidecar): task, input size, mean/std, class names, the
COCO category ids, decoding settings, the exporter used, measured parity and the training config
(which the runners use to rebuild the exact val preprocessing).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks.cli import run
from tasks.errors import ConfigError, user_errors_exit
from tasks.fold_bn import fold_batchnorm
from tasks.trained import load_trained_model

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "mobilevision-onnx"
SIDECAR_VERSION = 1
INPUT_NAME = "images"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_OPSET = 18


def task_of(cfg: DictConfig) -> str:
    task = (cfg.get("head") or {}).get("task") or cfg.dataset.get("task")
    if task not in ("detection", "segmentation"):
        raise ConfigError(f"head.task={task!r} in the checkpoint's config is not exportable; expected "
                          f"'detection' or 'segmentation'.")
    return str(task)


def instantiate_node(node: Any) -> Any:
    """hydra's instantiate, but a loader's own error (a missing file, a bad value) comes out as itself
    rather than wrapped in hydra's InstantiationException, so user_errors_exit can report it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it loads
            return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, OSError)):
            raise err.__cause__ from None
        raise


# -- what a deployment needs to know besides the graph --------------------------------------------
_KNOWN_CLASS_NAMES = {
    "tasks.segmentation.voc.VOCSegmentation": "tasks.segmentation.palette:VOC_CLASSES",
    "tasks.detection.voc.VOCDetection": "tasks.detection.voc:VOC_CLASSES",
}


def dataset_labels(cfg: DictConfig) -> tuple[list[str], list[int] | None]:
    """(class names, label -> COCO category id or None) of the checkpoint's dataset.

    Read from the val dataset itself (for COCO the annotation json, whose category ids are not
    contiguous); where its files are absent, from the config, the loader's defaults, or `class_<i>`.
    """
    num_classes = int(cfg.dataset.num_classes)
    try:
        dataset = instantiate_node(cfg.dataset.val)
        names = [str(n) for n in dataset.class_names]
        cat_ids = getattr(dataset, "label_to_cat_id", None)
        return names, ([int(c) for c in cat_ids] if cat_ids is not None else None)
    except (FileNotFoundError, ValueError, OSError, KeyError) as err:
        log.warning("cannot read the dataset's class names (%s); using the config's or generic ones", err)
    names = cfg.dataset.get("class_names") or cfg.dataset.val.get("class_names")
    target = str(cfg.dataset.val.get("_target_", ""))
    if not names and target in _KNOWN_CLASS_NAMES:
        module, attr = _KNOWN_CLASS_NAMES[target].split(":")
        names = getattr(__import__(module, fromlist=[attr]), attr)
    if not names or len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    return [str(n) for n in names], None


def model_metadata(cfg: DictConfig) -> dict[str, Any]:
    """The sidecar's description of the model, without export details."""
    task = task_of(cfg)
    size = int(cfg.dataset.input_size)
    val_tf = cfg.dataset.val.get("transforms") or {}
    class_names, cat_ids = dataset_labels(cfg)
    meta: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "task": task,
        "input_name": INPUT_NAME,
        "input_size": [size, size],
        "input_layout": "NCHW float32 RGB, (pixel / 255 - mean) / std",
        "mean": [float(v) for v in val_tf.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in val_tf.get("std", IMAGENET_STD)],
        "preprocess": ("resize to input_size x input_size (no letterbox)" if task == "detection" else
                       "shrink the longer side to input_size if larger, pad bottom/right with the mean colour"),
        "num_classes": int(cfg.dataset.num_classes),
        "class_names": class_names,
        "label_to_cat_id": cat_ids,
    }
    head = cfg.head
    if task == "detection":
        meta["postprocess"] = {
            "box_coder_weights": [float(w) for w in head.get("box_coder_weights", (10.0, 10.0, 5.0, 5.0))],
            "score_threshold": float(head.get("score_threshold", 0.01)),
            "nms_iou_threshold": float(head.get("nms_iou_threshold", 0.55)),
            "topk_candidates": int(head.get("topk_candidates", 300)),
            "detections_per_image": int(head.get("detections_per_image", 100)),
        }
    else:
        meta["postprocess"] = {"ignore_index": int(head.get("ignore_index", 255))}
    return meta


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX sidecar {path} does not exist; expected the JSON that tasks.export "
                                f"writes beside {Path(onnx_path).name}.")
    meta = json.loads(path.read_text())
    if meta.get("format") != SIDECAR_FORMAT or "task" not in meta:
        raise ValueError(f"{path} is not a mobilevision ONNX sidecar; expected format={SIDECAR_FORMAT!r} "
                         f"and a 'task' entry.")
    return meta


def write_json(data: Any, path: str | Path) -> Path:
    """Written to a temporary file and renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


# -- the graph -----------------------------------------------------------------------------------
class ExportWrapper(nn.Module):
    """`forward(images)` -> a tuple of the model's outputs in `output_names` order (ONNX wants tensors,
    not a dict); with `upsample_logits`, segmentation logits come out at the input size."""

    def __init__(self, model: nn.Module, output_names: Sequence[str], upsample_logits: bool = False):
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)
        self.upsample_logits = upsample_logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = dict(self.model(images))
        if self.upsample_logits and "logits" in outputs:
            outputs["logits"] = F.interpolate(outputs["logits"], size=images.shape[-2:], mode="bilinear",
                                              align_corners=False)
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
                 check_tolerance: float = 1e-3, source: str | None = None) -> Path:
    """Fold BN, export `model` to `path` (one self-contained .onnx file) and write the sidecar beside it.

    With `check`, ONNX Runtime runs the file on a random batch of 2 and a batch of 1; the largest
    absolute difference to PyTorch (the unfolded model) goes into the sidecar, and a difference above
    `check_tolerance` is an error.
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
    wrapper = ExportWrapper(folded, names, upsample_logits).eval()
    with torch.no_grad():
        shapes = {n: list(t.shape) for n, t in zip(names, wrapper(example))}
    batched = {n for n in names if _batched(n, reference[n], example.shape[0])}
    tmp = path.with_name(f".{path.name}.tmp")  # path itself appears only once the export passed its check
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
        meta |= {
            "output_names": names,
            "output_shapes": {n: (["batch", *s[1:]] if n in batched else s) for n, s in shapes.items()},
            "logits_upsampled": bool(upsample_logits) if meta["task"] == "segmentation" else None,
            "exporter": {"torch": torch.__version__, "dynamo": bool(dynamo), "opset": int(opset)},
            "batchnorms_folded": int(folded.folded_batchnorms),
            "source_checkpoint": source,
            "train_config": OmegaConf.to_container(cfg, resolve=True),
        }
        if check:  # against the original, unfolded model
            unfolded = ExportWrapper(model, names, upsample_logits).eval()
            meta["parity"] = check_parity(tmp, unfolded, names, example, check_tolerance)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(meta, sidecar_path(path))
    return path


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
                      upsample_logits: bool = False, check: bool = True, nms_in_graph: bool = False) -> Path:
    """`checkpoint` -> `output` (.onnx) + its sidecar; returns the .onnx path."""
    if nms_in_graph:
        raise ConfigError("nms_in_graph=true is not supported yet; the graph returns raw outputs and "
                          "tasks.onnx_runtime.decode_detections does the decoding and NMS.")
    output = Path(output)
    if output.suffix != ".onnx":
        raise ConfigError(f"output={output} must end in .onnx.")
    model, cfg = load_trained_model(checkpoint)
    return export_model(model, cfg, output, opset, dynamo, upsample_logits, check, source=str(checkpoint))


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.format != "onnx":
        raise ConfigError(f"format={cfg.format} is not supported; expected onnx.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir) / "model.onnx"
    path = export_checkpoint(cfg.checkpoint, output, cfg.opset, cfg.dynamo, cfg.upsample_logits, cfg.check,
                             cfg.nms_in_graph)
    meta = read_sidecar(path)
    parity = meta.get("parity", {}).get("max_abs_diff")
    print(f"wrote {path} and {sidecar_path(path)} ({meta['task']}, input {meta['input_size']}, "
          f"opset {meta['exporter']['opset']}, {'dynamo' if meta['exporter']['dynamo'] else 'torchscript'} "
          f"exporter, {meta['batchnorms_folded']} BatchNorms folded)")
    if parity:
        print("max |onnxruntime - pytorch|: " + ", ".join(f"{k}={v:.2e}" for k, v in parity.items()))


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "export")


if __name__ == "__main__":
    cli()
