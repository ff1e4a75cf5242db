"""On-device exports: `python -m tasks.export checkpoint=... format=tflite|executorch|coreml [precision=int8]`.

Every format gets the same graph, `MobileGraph`, at batch 1 with BatchNorm folded: the raw head outputs
(for the parity check on raw tensors) plus the post-processing the runtime can hold (tasks/deploy/in_graph.py):
- SSDLite: `cls_logits`, `bbox_regression`, `candidate_boxes` [1, K, k, 4], `candidate_scores` [1, K, k]
  (decoding, softmax and per-class top-k inside; NMS outside, in the runner: in_graph.select_detections);
- DeepLab: `logits` and `labels` [1, H, W] (argmax at the input size).
int8 is post-training static quantization (PT2E) calibrated on `calibration_images` training images under
the val transforms. Beside the file goes the sidecar JSON (tasks/deploy/sidecar.py's model_metadata, plus
format, precision, output names and the measured parity); Core ML also gets class names and preprocessing
in the package's own metadata.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks.deploy.fold_bn import fold_batchnorm
from tasks.deploy.in_graph import CANDIDATE_OUTPUTS, CandidateDecoder, LabelMap
from tasks.deploy.parity import compare_runner
from tasks.deploy.sidecar import model_metadata, refuse_to_overwrite, sidecar_path, write_json
from tasks.errors import ConfigError, DataError
from tasks.resolve import instantiate_from_file
from tasks.training.trained import load_trained_model, rebase_dataset_root

log = logging.getLogger(__name__)

FORMATS = {"tflite": ".tflite", "executorch": ".pte", "coreml": ".mlpackage"}
RUNTIME_OF = {"tflite": "litert", "executorch": "executorch", "coreml": None}
PRECISIONS = ("fp32", "int8")


class MobileGraph(nn.Module):
    """images [1, 3, H, W] -> raw outputs + post-processing outputs, in `output_names` order. The
    post-processing is a submodule of its own (`post`), which int8 conversion leaves in float."""

    def __init__(self, model: nn.Module, meta: dict[str, Any]):
        super().__init__()
        self.model = model
        self.task = meta["task"]
        if self.task == "detection":
            self.post: nn.Module = CandidateDecoder(meta["postprocess"])
            self.output_names = ["cls_logits", "bbox_regression", *CANDIDATE_OUTPUTS]
        else:
            self.post = LabelMap()
            self.output_names = ["logits", "labels"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        if self.task == "detection":
            boxes, scores = self.post(outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"])
            return outputs["cls_logits"], outputs["bbox_regression"], boxes, scores
        return outputs["logits"], self.post(outputs["logits"], images)


def calibration_images(cfg: DictConfig, count: int, seed: int = 0, source: str = "the model's config",
                       trusted: Sequence[str] = ()) -> list[torch.Tensor]:
    """`count` training images under the val transforms (the deployed preprocessing), a seeded sample."""
    from tasks.deploy.int8 import split_with_val_transforms

    if cfg.dataset.get("prepare") is not None:
        instantiate_from_file(cfg.dataset.prepare, source, trusted)
    train_set = split_with_val_transforms(cfg, "train", source, trusted)
    count = min(count, len(train_set))
    indices = sorted(random.Random(seed).sample(range(len(train_set)), count))
    return [train_set[i][0] for i in indices]


def val_images(cfg: DictConfig, count: int, source: str = "the model's config",
               trusted: Sequence[str] = ()) -> list[torch.Tensor]:
    val_set = instantiate_from_file(cfg.dataset.val, source, trusted)
    return [val_set[i][0] for i in range(min(count, len(val_set)))]


def convert(graph: MobileGraph, fmt: str, example: torch.Tensor, path: Path, precision: str,
            calibration: Sequence[torch.Tensor], meta: dict[str, Any]) -> Path:
    if fmt == "tflite":
        from tasks.deploy.litert import convert_litert

        return convert_litert(graph, example, path, precision, calibration)
    if fmt == "executorch":
        from tasks.deploy.executorch import convert_executorch

        return convert_executorch(graph, example, path, precision, calibration)
    from tasks.deploy.coreml import convert_coreml

    return convert_coreml(graph, example, path, precision, meta)


def export_mobile_model(model: nn.Module, cfg: DictConfig, fmt: str, path: str | Path, precision: str = "fp32",
                        num_calibration: int = 32, check: bool = True, parity_images: int = 4,
                        source: str | None = None, calibration: Sequence[torch.Tensor] | None = None,
                        trusted: Sequence[str] = ()) -> Path:
    """Fold BN, convert to `fmt`, write the sidecar; with `check`, run the file in its runtime on real val
    images and record raw-output and final-result parity against the unfolded PyTorch model. int8 calibrates
    on `calibration` images if given, else on `num_calibration` training images of the config's dataset."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is not an on-device format; expected one of {', '.join(FORMATS)}.")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision} is not supported; expected one of {', '.join(PRECISIONS)}.")
    if fmt == "coreml" and precision == "int8":
        raise ConfigError("format=coreml supports precision=fp32 here (Core ML's int8 needs its own "
                          "calibration flow); use format=tflite or executorch for int8.")
    path = Path(path)
    if path.suffix != FORMATS[fmt]:
        raise ConfigError(f"output={path} must end in {FORMATS[fmt]} for format={fmt}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = model_metadata(cfg)
    height, width = meta["input_size"]
    model = model.cpu().eval()
    graph = MobileGraph(fold_batchnorm(model), meta).eval()
    example = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    if precision != "int8":
        calibration = []
    elif calibration is None:
        calibration = calibration_images(cfg, num_calibration, source=str(source), trusted=trusted)
    if precision == "int8" and not calibration:
        raise ConfigError("precision=int8 needs training images to calibrate on; the training split is empty.")
    convert(graph, fmt, example, path, precision, calibration, meta)
    meta |= {
        "artifact_format": fmt,
        "precision": precision,
        "batch_size": 1,
        "output_names": graph.output_names,
        "postprocess_in_graph": "candidates" if meta["task"] == "detection" else "labels",
        "calibration": {"images": len(calibration), "split": "train", "seed": 0} if calibration else None,
        "batchnorms_folded": int(graph.model.folded_batchnorms),
        "exporter": {"torch": torch.__version__, "converter": converter_version(fmt)},
        "source_checkpoint": source,
        "train_config": OmegaConf.to_container(cfg, resolve=True),
    }
    runtime = RUNTIME_OF[fmt]
    if check and runtime is not None:
        runner = _runner(path, runtime, meta)
        try:
            images = torch.stack(val_images(cfg, parity_images, str(source), trusted) or [example[0]])
        except (FileNotFoundError, DataError, OSError) as err:  # the dataset is gone: the artifact still exports
            log.warning("parity is checked on a random image: the val images cannot be read (%s)", err)
            images = example
        meta["parity"] = compare_runner(runner, model, images)
    write_json(meta, sidecar_path(path))
    return path


def _runner(path: Path, runtime: str, meta: dict[str, Any]):
    if runtime == "litert":
        from tasks.deploy.litert import LiteRTModel

        return LiteRTModel(path, threads=1, metadata=meta)
    from tasks.deploy.executorch import ExecuTorchModel

    return ExecuTorchModel(path, threads=1, metadata=meta)


def converter_version(fmt: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    package = {"tflite": "litert-torch", "executorch": "executorch", "coreml": "coremltools"}[fmt]
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return None


def export_mobile(checkpoint: str | Path, fmt: str, output: str | Path, precision: str = "fp32",
                  num_calibration: int = 32, check: bool = True, dataset_root: str | None = None,
                  trusted: Sequence[str] = (), overwrite: bool = False) -> Path:
    """`checkpoint` -> `output` in `fmt` + its sidecar; returns the file's path. A built-in dataset that int8
    calibration needs is written under the output's folder, never into the current one."""
    from tasks.deploy.int8 import calibration_config

    output = Path(output)
    refuse_to_overwrite([output, sidecar_path(output)], overwrite)
    model, cfg = load_trained_model(checkpoint, trusted=trusted)
    if dataset_root is not None:
        cfg = rebase_dataset_root(cfg, dataset_root)
    calibration = None
    if precision == "int8":  # the sidecar keeps the checkpoint's own dataset paths; only calibration moves
        calibration = calibration_images(calibration_config(cfg, output.parent, None), num_calibration,
                                         source=str(checkpoint), trusted=trusted)
    return export_mobile_model(model, cfg, fmt, output, precision, num_calibration, check, source=str(checkpoint),
                               calibration=calibration, trusted=trusted)


def summary_line(path: Path, meta: dict[str, Any]) -> str:
    parity = meta.get("parity") or {}
    raw = ", ".join(f"{k}={v:.2e}" for k, v in (parity.get("raw_max_abs_diff") or {}).items())
    final = {k: v for k, v in parity.items() if k not in ("raw_max_abs_diff", "raw_relative_diff")}
    line = f"wrote {path} and {sidecar_path(path)} ({meta['task']}, {meta['precision']}, input {meta['input_size']})"
    if parity:
        line += f"\nmax |{meta['artifact_format']} - pytorch| on raw outputs: {raw}\nresults: {final}"
    return line


__all__ = ["FORMATS", "MobileGraph", "export_mobile", "export_mobile_model", "summary_line"]
