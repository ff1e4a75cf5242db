"""litert-torch's PT2E quantizer, plus the residual adds and concatenations it no longer finds.

litert-torch 0.10 finds `add`, `cat` (and a few more) by `get_source_partitions(graph, [torch.cat])`. Under
torch >= 2.10 an exported graph records where a node came from as `torch_fn` (a name, "cat"), which that
function matches against names only, so the function objects match nothing: every residual add and every
concatenation stays unannotated. The MLIR converter then quantizes them itself with scales of its own
choosing; for SSDLite's concatenated head outputs that range clips the box codes and logits (int8 raw outputs
72-92 % off, 82 % of the detections kept; measured on the shapes demo checkpoint).

`LiteRTQuantizer` annotates those nodes the way litert-torch's own annotators would (add: input and output
observers of the global config; cat: one observer shared by every input and the output) and leaves the rest
to litert-torch. Only nodes computed from the image are annotated: constants built in the graph (SSDLite's
anchors) and the float post-processing (`float_modules`) stay float.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule, Node

from tasks.deploy.in_graph import from_modules, type_name


def image_dependent_nodes(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose value depends on a graph input (the image), not only on parameters and constants."""
    dependent: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def annotate_adds_and_concatenations(model: GraphModule, config, float_modules: Iterable[type] = ()) -> int:
    """Annotates the image-dependent `aten.add.Tensor` and `aten.cat` nodes outside `float_modules` that no
    annotator has claimed; returns how many."""
    from litert_torch.quantize.pt2e_quantizer_utils import _is_annotated, get_input_act_qspec, get_output_act_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    float_modules = tuple(float_modules)
    dependent = image_dependent_nodes(model.graph)
    count = 0
    for node in model.graph.nodes:
        claimed = node.op != "call_function" or _is_annotated([node]) or node not in dependent
        if claimed or from_modules(node, float_modules):
            continue
        if node.target == torch.ops.aten.add.Tensor:
            inputs = [a for a in node.args[:2] if isinstance(a, Node)]
            if len(inputs) != 2 or not all(a in dependent for a in inputs):
                continue
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: get_input_act_qspec(config) for a in inputs},
                output_qspec=get_output_act_qspec(config), _annotated=True)
        elif node.target == torch.ops.aten.cat.default:
            inputs = list(node.args[0])
            if not inputs or not all(isinstance(a, Node) and a in dependent for a in inputs):
                continue
            shared = SharedQuantizationSpec((inputs[0], node))
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: (get_input_act_qspec(config) if i == 0 else shared) for i, a in enumerate(inputs)},
                output_qspec=shared, _annotated=True)
        else:
            continue
        count += 1
    return count


def litert_quantizer(config, float_modules: Iterable[type] = ()):
    """litert-torch's PT2EQuantizer with `config` everywhere but `float_modules`, plus the adds and
    concatenations above."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    float_modules = tuple(float_modules)

    class LiteRTQuantizer(PT2EQuantizer):
        def annotate(self, model: GraphModule) -> GraphModule:
            # before litert-torch's pass, whose last step propagates annotations through views and permutes
            annotate_adds_and_concatenations(model, self.global_config, float_modules)
            return super().annotate(model)

    quantizer = LiteRTQuantizer().set_global(config)
    for module_type in float_modules:  # this quantizer compares the type names torch.export records
        quantizer.set_module_type(type_name(module_type), None)
    return quantizer


__all__ = ["annotate_adds_and_concatenations", "image_dependent_nodes", "litert_quantizer"]
