"""ExecuTorch: a .pte lowered to the XNNPACK backend (fp32, or int8 by PT2E static quantization with
XNNPACK's quantizer) and a runner over ExecuTorch's Python runtime with the PyTorch model's surface.

Both come from `mobilevision[mobile]`. The graph is tasks.deploy.mobile_export.MobileGraph at batch 1. NMS
stays outside the graph (ExecuTorch has no NMS kernel; torchvision::nms does not lower to XNNPACK): the
runner applies tasks.deploy.in_graph.select_detections to the candidates. Ops XNNPACK does not take
(top-k, gather, argmax) run in ExecuTorch's portable kernels, and so does the label map's upsample in int8
graphs (int8_partitioner_configs says why).

int8: weights int8 symmetric per channel, activations int8 (XNNPACKQuantizer's symmetric config, plus conv +
ReLU6 fusion: tasks/deploy/pt2e_quantizers.py), observers calibrated on the given images; input and outputs
stay float32 (quantize / dequantize inside the graph).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.deploy.in_graph import FLOAT_MODULES, from_modules
from tasks.deploy.runner import DeployedModel

log = logging.getLogger(__name__)


def convert_executorch(graph: nn.Module, example: torch.Tensor, path: Path, precision: str = "fp32",
                       calibration: Sequence[torch.Tensor] = ()) -> Path:
    """`graph` (batch-1 example) -> a .pte file at `path`, delegated to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    args = (example,)
    if precision == "int8":
        from tasks.deploy.pt2e_quantizers import quantize_pt2e, xnnpack_quantizer

        # the post-processing stays float32
        graph = quantize_pt2e(graph, args, xnnpack_quantizer(FLOAT_MODULES), calibration)
    program = torch.export.export(graph, args)
    partitioner = XnnpackPartitioner(configs=int8_partitioner_configs() if precision == "int8" else None)
    lowered = to_edge_transform_and_lower(program, partitioner=[partitioner]).to_executorch()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(lowered.buffer)
    tmp.replace(path)
    return path


def int8_partitioner_configs() -> list:
    """XNNPACK's partitioner configs, but the label map's bilinear upsample runs in ExecuTorch's portable kernel.

    In an int8 graph that upsample takes the dequantized logits, and XNNPACK (executorch 1.5) hands its output
    back in the wrong layout: where the shapes coincide (a 64 px input, 4x4 logits of 4 classes) the label map
    is silently wrong (18 % of pixels agree), elsewhere the method fails ("Attempted to resize a static tensor.
    Expected shape (1, 4, 160, 160), but received (1, 10, 160, 160)", error 0x10)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import UpsampleBilinear2dConfig

    class NetworkUpsampleOnly(UpsampleBilinear2dConfig):
        def check_constraints(self, node, ep) -> bool:
            return not from_modules(node, FLOAT_MODULES) and super().check_constraints(node, ep)

    return [NetworkUpsampleOnly if c is UpsampleBilinear2dConfig else c for c in ALL_PARTITIONER_CONFIGS]


class ExecuTorchModel(DeployedModel):
    """A .pte and its sidecar, run by ExecuTorch's Python runtime (XNNPACK on the CPU)."""

    batch = 1

    def __init__(self, path: str | Path, threads: int | None = None, metadata: Mapping[str, Any] | None = None):
        from executorch.runtime import Runtime

        super().__init__(path, metadata)
        if threads:  # XNNPACK's thread pool is ExecuTorch's; it is set process-wide
            _set_threadpool_size(int(threads))
        self.program = Runtime.get().load_program(str(self.path))
        self.method = self.program.load_method("forward")
        self.output_names = list(self.metadata["output_names"])

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.method.execute([torch.from_numpy(images)])
        return {name: value.numpy().copy() for name, value in zip(self.output_names, outputs)}


def _set_threadpool_size(threads: int) -> None:
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    except (ImportError, AttributeError, RuntimeError) as err:
        log.debug("ExecuTorch's thread pool size cannot be set here (%s); it uses its default", err)


__all__ = ["ExecuTorchModel", "convert_executorch"]
