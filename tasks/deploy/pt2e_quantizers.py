"""The PT2E quantizers of the LiteRT and ExecuTorch conversions, with the annotations their own miss.

- ReLU6 (litert-torch 0.10 and ExecuTorch 1.5's XNNPACKQuantizer): both fuse conv + ReLU but not conv +
  ReLU6 (aten.hardtanh 0..6), which shares the conv's observer, so MobileNets' activations are quantized over
  the pre-activation's range (its negative half and outliers beyond 6) instead of [0, 6].
  `annotate_conv_relu6` observes the pair after the clamp, as both do for ReLU. On the shapes demo SSDLite
  checkpoint this takes the PT2E model's mean raw-output error from 9 % / 22 % to 6 % / 16 %
  (cls_logits / bbox_regression, relative to their largest magnitude).
- add and cat (litert-torch only): it finds them by `get_source_partitions(graph, [torch.cat])`; under
  torch >= 2.10 an exported graph records `torch_fn` names ("cat"), which that function matches against names
  only, so no residual add or concatenation is annotated. The MLIR converter then quantizes them with scales
  of its own choosing; for SSDLite's concatenated head outputs that range clipped the box codes and logits
  (int8 raw outputs 72-92 % off on the demo checkpoint). `annotate_adds_and_concatenations` observes them as
  litert-torch's annotators would (add: input and output observers; cat: one observer shared by every input
  and the output).

Only nodes computed from the image are annotated: constants built in the graph (SSDLite's anchors) and the
float post-processing (`float_modules`, tasks.deploy.in_graph.FLOAT_MODULES) stay float. Annotations run
before the converter's own, which skip nodes already annotated.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule, Node

from tasks.deploy.in_graph import from_modules, type_name

CONVOLUTIONS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
RELU6 = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)


def _claimed(node: Node) -> bool:
    annotation = node.meta.get("quantization_annotation")
    return bool(annotation is not None and annotation._annotated)


def image_dependent_nodes(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose value depends on a graph input (the image), not only on parameters and constants."""
    dependent: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def annotate_conv_relu6(model: GraphModule, config, float_modules: Iterable[type] = ()) -> int:
    """Each conv -> ReLU6 pair outside `float_modules`: the conv takes `config`'s input / weight / bias specs
    and no output observer, the ReLU6 the output observer. Returns how many pairs."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    float_modules = tuple(float_modules)
    count = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in RELU6 or tuple(node.args[1:3]) != (0.0, 6.0):
            continue
        conv = node.args[0]
        if not isinstance(conv, Node) or conv.target not in CONVOLUTIONS or len(conv.users) != 1:
            continue
        weight, bias = conv.args[1], (conv.args[2] if len(conv.args) > 2 else None)
        partition = [node, conv, weight] + ([bias] if isinstance(bias, Node) else [])
        if any(_claimed(n) for n in partition) or any(from_modules(n, float_modules) for n in (node, conv)):
            continue
        inputs = {conv.args[0]: config.input_activation, weight: config.weight}
        if isinstance(bias, Node) and config.bias is not None:
            inputs[bias] = config.bias
        conv.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        node.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=config.output_activation,
                                                                      _annotated=True)
        for parameter in partition[2:]:
            parameter.meta.setdefault("quantization_annotation", QuantizationAnnotation())._annotated = True
        count += 1
    return count


def annotate_adds_and_concatenations(model: GraphModule, config, float_modules: Iterable[type] = ()) -> int:
    """Annotates the image-dependent `aten.add.Tensor` and `aten.cat` nodes outside `float_modules` that no
    annotator has claimed; returns how many."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    float_modules = tuple(float_modules)
    dependent = image_dependent_nodes(model.graph)
    count = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or _claimed(node) or node not in dependent or from_modules(node, float_modules):
            continue
        if node.target == torch.ops.aten.add.Tensor:
            inputs = [a for a in node.args[:2] if isinstance(a, Node)]
            if len(inputs) != 2 or not all(a in dependent for a in inputs):
                continue
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: config.input_activation for a in inputs},
                output_qspec=config.output_activation, _annotated=True)
        elif node.target == torch.ops.aten.cat.default:
            inputs = list(node.args[0])
            if not inputs or not all(isinstance(a, Node) and a in dependent for a in inputs):
                continue
            shared = SharedQuantizationSpec((inputs[0], node))
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: (config.input_activation if i == 0 else shared) for i, a in enumerate(inputs)},
                output_qspec=shared, _annotated=True)
        else:
            continue
        count += 1
    return count


def litert_quantizer(float_modules: Iterable[type] = ()):
    """litert-torch's PT2EQuantizer, int8 symmetric per channel, everywhere but `float_modules`, plus the
    ReLU6 pairs, adds and concatenations above."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    float_modules = tuple(float_modules)

    class LiteRTQuantizer(PT2EQuantizer):
        def annotate(self, model: GraphModule) -> GraphModule:
            # before litert-torch's pass, whose last step propagates annotations through views and permutes
            annotate_conv_relu6(model, self.global_config, float_modules)
            annotate_adds_and_concatenations(model, self.global_config, float_modules)
            return super().annotate(model)

    quantizer = LiteRTQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                is_dynamic=False))
    for module_type in float_modules:  # this quantizer compares the type names torch.export records
        quantizer.set_module_type(type_name(module_type), None)
    return quantizer


def xnnpack_quantizer(float_modules: Iterable[type] = ()):
    """ExecuTorch's XNNPACKQuantizer, int8 symmetric per channel, everywhere but `float_modules`, plus the
    ReLU6 pairs above."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    float_modules = tuple(float_modules)

    class ReLU6XNNPACKQuantizer(XNNPACKQuantizer):
        def annotate(self, model: GraphModule) -> GraphModule:
            annotate_conv_relu6(model, self.global_config, float_modules)
            return super().annotate(model)

    quantizer = ReLU6XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    for module_type in float_modules:
        quantizer.set_module_type(module_type, None)
    return quantizer


def quantize_pt2e(graph: torch.nn.Module, args: tuple, quantizer, calibration: Iterable[torch.Tensor],
                  fold_quantize: bool = True) -> torch.nn.Module:
    """PT2E post-training quantization: export `graph`, observe it on the calibration images (CHW or NCHW),
    convert, and return the quantized module in eval mode (shared by the LiteRT and ExecuTorch paths)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(graph, args).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image[None] if image.dim() == 3 else image)
    return move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=fold_quantize))


__all__ = ["annotate_adds_and_concatenations", "annotate_conv_relu6", "image_dependent_nodes", "litert_quantizer",
           "quantize_pt2e", "xnnpack_quantizer"]
