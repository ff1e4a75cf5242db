"""Core ML: an .mlpackage (ML program) converted by coremltools from tasks.deploy.mobile_export.MobileGraph.

The package's own metadata holds what an app needs: `user_defined_metadata` carries, as `mobilevision.<key>`,
the class names, mean, std, input size, task and decoding settings (as JSON strings, Core ML's metadata
values are strings); the description names the preprocessing. Prediction needs Core ML itself (macOS /
iOS); elsewhere only the conversion runs.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.deploy.sidecar import INPUT_NAME

log = logging.getLogger(__name__)

PREFIX = "mobilevision."  # coremltools keeps its own keys (its version, the source) beside ours
METADATA_KEYS = ("task", "class_names", "mean", "std", "input_size", "input_layout", "preprocess", "postprocess",
                 "label_to_cat_id")


def prediction_unavailable_reason() -> str | None:
    """Why Core ML cannot run a model on this machine, or None where it can (macOS)."""
    if sys.platform != "darwin":
        return f"Core ML runs models only on macOS / iOS; this is {sys.platform} (conversion is still checked)."
    return None


def convert_coreml(graph: nn.Module, example: torch.Tensor, path: Path, precision: str,
                   meta: dict[str, Any]) -> Path:
    """`graph` (batch-1 example) -> an fp32 .mlpackage at `path`, with the model's metadata inside."""
    import coremltools as ct

    program = torch.export.export(graph, (example,)).run_decompositions({})
    model = ct.convert(program, inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape))],
                       outputs=[ct.TensorType(name=name) for name in graph.output_names],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=ct.target.iOS17)
    model.short_description = (f"mobilevision {meta['task']} model; input {INPUT_NAME} [1, 3, "
                               f"{meta['input_size'][0]}, {meta['input_size'][1]}] float32 RGB, "
                               f"{meta['input_layout']}; see user_defined_metadata")
    model.user_defined_metadata.update({PREFIX + key: json.dumps(meta.get(key)) for key in METADATA_KEYS})
    model.user_defined_metadata[PREFIX + "output_names"] = json.dumps(list(graph.output_names))
    tmp = path.with_name(f".tmp.{path.name}")  # Core ML insists on the .mlpackage suffix
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata convert_coreml stored in the package (needs coremltools, not Core ML)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    return {k[len(PREFIX):]: json.loads(v) for k, v in spec.description.metadata.userDefined.items()
            if k.startswith(PREFIX)}


__all__ = ["convert_coreml", "prediction_unavailable_reason", "read_metadata"]
