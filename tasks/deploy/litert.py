"""LiteRT (TFLite): conversion with litert-torch (fp32, or int8 by PT2E static quantization) and a runner
over the LiteRT interpreter (ai-edge-litert) with the PyTorch model's surface.

Both come from `mobilevision[mobile]`. The graph is tasks.deploy.mobile_export.MobileGraph at batch 1: raw
outputs plus the post-processing up to NMS (decoding, softmax, per-class top-k; SSDLite) or the label map
(DeepLab). NMS stays outside the graph: LiteRT's NMS ops are single-class (NON_MAX_SUPPRESSION_V4/V5) or
the custom TFLite_Detection_PostProcess op, which litert-torch does not emit; the runner applies
tasks.deploy.in_graph.select_detections (the head's rule) to the candidates.

int8: weights int8 per channel, activations int8, symmetric (litert-torch's PT2EQuantizer, plus the ReLU6s,
adds and concatenations it misses: tasks/deploy/pt2e_quantizers.py), observers calibrated on the given images.
Depending on the graph, the converter keeps a float32 input (a QUANTIZE op first) or makes it int8; raw
outputs may come out int8 with their scale / zero point: the runner quantizes the input and dequantizes the
outputs as the file's tensors say.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.deploy.in_graph import FLOAT_MODULES, CandidateDecoder
from tasks.deploy.runner import DeployedModel

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_converter():
    """litert-torch prints its progress and the MLIR converter warns per op on stderr: keep the user's console
    to our own lines (both go to the log at debug level)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("litert-torch output:\n%s", buffer.getvalue())


def tflite_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk along the last axis as LiteRT's TOPK_V2. litert-torch lowers torch.topk to a sort, which
    the LiteRT interpreter cannot run ("Didn't find op for builtin opcode 'STABLEHLO_SORT'") unless k is the
    whole axis; its own tfl.topk_v2 op lowers to TOPK_V2."""
    values, index = torch.ops.tfl.topk_v2(x, k)
    return values, index.long()


@contextlib.contextmanager
def tflite_ops(graph: nn.Module):
    """`graph`'s candidate decoders use tflite_topk while it converts."""
    from litert_torch.backend.experimental import torch_tfl  # noqa: F401 - registers torch.ops.tfl

    decoders = [m for m in graph.modules() if isinstance(m, CandidateDecoder)]
    previous = [m.topk for m in decoders]
    for decoder in decoders:
        decoder.topk = tflite_topk
    try:
        yield
    finally:
        for decoder, topk in zip(decoders, previous):
            decoder.topk = topk


def convert_litert(graph: nn.Module, example: torch.Tensor, path: Path, precision: str = "fp32",
                   calibration: Sequence[torch.Tensor] = ()) -> Path:
    """`graph` (batch-1 example) -> a .tflite file at `path`."""
    import litert_torch

    args = (example,)
    with quiet_converter(), tflite_ops(graph):
        if precision == "int8":
            from litert_torch.quantize.quant_config import QuantConfig

            from tasks.deploy.pt2e_quantizers import litert_quantizer, quantize_pt2e

            quantizer = litert_quantizer(FLOAT_MODULES)  # the post-processing stays float32
            quantized = quantize_pt2e(graph, args, quantizer, calibration, fold_quantize=False)
            edge = litert_torch.convert(quantized, args, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        else:
            edge = litert_torch.convert(graph, args)
        edge.export(str(path))
    return path


class LiteRTModel(DeployedModel):
    """A .tflite and its sidecar, run by the LiteRT interpreter (XNNPACK delegate on the CPU)."""

    batch = 1

    def __init__(self, path: str | Path, threads: int | None = None, metadata: Mapping[str, Any] | None = None):
        from ai_edge_litert.interpreter import Interpreter

        super().__init__(path, metadata)
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=int(threads) if threads else None)
        self.interpreter.allocate_tensors()
        self.input_detail = self.interpreter.get_input_details()[0]
        details = self.interpreter.get_output_details()
        names = list(self.metadata.get("output_names") or [d["name"] for d in details])
        if len(names) != len(details):
            raise ValueError(f"{self.path.name} has {len(details)} outputs; its sidecar names {len(names)}.")
        # the signature maps output_0, output_1, ... (the module's return order) to tensor indices
        signature = self.interpreter._get_full_signature_list()["serving_default"]["outputs"]
        by_index = {d["index"]: d for d in details}
        self.output_details = [by_index[signature[f"output_{i}"]] for i in range(len(details))]
        self.output_names = names

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        dtype = self.input_detail["dtype"]
        if dtype != np.float32:  # a full-integer graph takes the quantized image
            scale, zero = self.input_detail["quantization"]
            info = np.iinfo(dtype)
            images = np.clip(np.round(images / scale) + zero, info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input_detail["index"], images)
        self.interpreter.invoke()
        out = {}
        for name, detail in zip(self.output_names, self.output_details):
            value = self.interpreter.get_tensor(detail["index"])
            scale, zero = detail["quantization"]
            if value.dtype in (np.int8, np.uint8, np.int16) and scale:
                value = (value.astype(np.float32) - zero) * scale
            out[name] = value.copy()
        return out


__all__ = ["LiteRTModel", "convert_litert"]
