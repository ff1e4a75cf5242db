"""Post-processing that goes inside an exported graph, written once in PyTorch for every converter.

- `DetectionCandidates`: the SSDLite head's decoding up to NMS: boxes decoded against the anchors
  (normalised xyxy, clipped to [0, 1]), softmax scores without the background column, and per class the
  `topk_candidates` best anchors, of which only the image's `nms_pre` best pairs keep their score.
  Outputs `candidate_boxes` [B, K, k, 4] and `candidate_scores` [B, K, k] (sorted, highest first). NMS
  follows in the runtime's own op (ONNX: tasks/deploy/onnx_nms.py) or outside the graph (`select_detections`,
  the same rule in PyTorch).
- `SegmentationLabels`: logits upsampled (bilinear) to the input size and their argmax, `labels` [B, H, W].

Boxes are normalised because the graph does not know the original image size; the head scales by (w, h)
before clipping, which gives the same numbers (clip(x, 0, 1) * s == min(max(x * s, 0), s)), and IoU is
unchanged by scaling each axis, so NMS keeps the same boxes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from heads.ssdlite.box_coder import BoxCoder

DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
CANDIDATE_OUTPUTS = ("candidate_boxes", "candidate_scores")
# decode_in_graph (tasks/deploy/onnx_export.py): SSDLite's dense decoding after its raw outputs; selection, NMS outside
DECODED_OUTPUTS = ("class_scores", "best_class_score", "anchor_boxes")
SEGMENTATION_OUTPUTS = ("labels",)


def num_candidates(settings: Mapping[str, Any], num_anchors: int) -> int:
    return min(int(settings["topk_candidates"]), int(num_anchors))


def max_detections(settings: Mapping[str, Any], num_classes: int, candidates: int) -> int:
    return min(int(settings["detections_per_image"]), num_classes * candidates)


def check_settings(settings: Mapping[str, Any]) -> None:
    """Decoding keys this graph does not implement stop the export instead of decoding differently."""
    from tasks.errors import ConfigError

    known = {"box_coder_weights", "score_threshold", "nms_iou_threshold", "topk_candidates",
             "detections_per_image", "nms_pre"}
    unknown = sorted(k for k, v in settings.items() if k not in known and v is not None)
    if unknown:
        raise ConfigError(f"the head's decoding settings {unknown} are not implemented inside exported graphs; "
                          f"export with nms_in_graph=false (decoding outside the graph) or set them to null.")


def last_dim_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, int64 indices) of the `k` largest along the last axis, highest first."""
    return x.topk(k, dim=-1)


class CandidateDecoder(nn.Module):
    """(cls_logits, bbox_regression, anchors) -> (candidate_boxes, candidate_scores). A module of its own so
    that quantizers can leave it in float (int8 graphs quantize the network, not the decoding). `topk` is
    the top-k op along the last axis; a converter whose lowering of torch.topk fails swaps in its own."""

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__()
        check_settings(settings)
        self.topk = last_dim_topk
        self.box_coder = BoxCoder(tuple(settings["box_coder_weights"]))
        self.topk_candidates = int(settings["topk_candidates"])
        self.nms_pre = None if settings.get("nms_pre") is None else int(settings["nms_pre"])

    def forward(self, logits: Tensor, codes: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        boxes = self.box_coder.decode(codes.float(), anchors[None]).clamp(0.0, 1.0)  # [B, A, 4]
        scores = F.softmax(logits.float(), dim=-1)[..., 1:].transpose(1, 2)  # [B, K, A]
        scores, index = self.topk(scores, min(self.topk_candidates, scores.shape[-1]))  # [B, K, k]
        num_classes = scores.shape[1]
        if self.nms_pre is not None and self.nms_pre < scores.shape[1] * scores.shape[2]:
            # the head's nms_pre: only the best nms_pre (class, anchor) pairs of an image reach NMS; the rest
            # get score 0, below any score_threshold (pairs tied with the last one kept are kept too)
            kth = self.topk(scores.flatten(1), self.nms_pre)[0][:, -1:, None]  # [B, 1, 1]
            scores = torch.where(scores >= kth, scores, torch.zeros_like(scores))
        per_class = boxes[:, None].expand(-1, num_classes, -1, -1)
        candidates = torch.gather(per_class, 2, index[..., None].expand(-1, -1, -1, 4))
        return candidates, scores


class LabelMap(nn.Module):
    """(logits, images) -> labels [B, H, W] int64: argmax of the logits upsampled to the images' size."""

    def forward(self, logits: Tensor, images: Tensor) -> Tensor:
        if tuple(logits.shape[-2:]) != tuple(images.shape[-2:]):
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1)


FLOAT_MODULES = (CandidateDecoder, LabelMap)  # int8 conversion quantizes the network, not these


def type_name(module_type: type) -> str:
    """A class as torch.export's nn_module_stack may record it."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def from_modules(node: Any, module_types: Sequence[type] = FLOAT_MODULES) -> bool:
    """Whether an exported graph's node (torch.fx.Node) was traced inside one of `module_types`."""
    names = {type_name(t) for t in module_types}
    return any((t if isinstance(t, str) else type_name(t)) in names
               for _, t in (node.meta.get("nn_module_stack") or {}).values())


class DetectionCandidates(nn.Module):
    """model(images) -> (candidate_boxes [B, K, k, 4] normalised xyxy, candidate_scores [B, K, k])."""

    def __init__(self, model: nn.Module, settings: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.decoder = CandidateDecoder(settings)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images)
        return self.decoder(outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"])


class SegmentationLabels(nn.Module):
    """model(images) -> labels [B, H, W] int64: argmax of the logits upsampled to the input size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.label_map = LabelMap()

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (self.label_map(self.model(images)["logits"], images),)


def in_graph_wrapper(model: nn.Module, meta: Mapping[str, Any]) -> tuple[nn.Module, list[str]]:
    """(module whose outputs end in the post-processing, its output names) for a model described by `meta`."""
    if meta["task"] == "detection":
        return DetectionCandidates(model, meta["postprocess"]).eval(), list(CANDIDATE_OUTPUTS)
    return SegmentationLabels(model).eval(), list(SEGMENTATION_OUTPUTS)


def select_detections(candidate_boxes: Tensor, candidate_scores: Tensor,
                      settings: Mapping[str, Any]) -> dict[str, Tensor]:
    """Candidates -> the fixed-size detection outputs of a graph with NMS inside, in PyTorch (for runtimes
    whose graph stops at the candidates): per image, scores above the threshold, class-wise NMS, the
    `detections_per_image` best. Padding rows have score 0, label -1 and a zero box."""
    batch, num_classes, k, _ = candidate_boxes.shape
    limit = max_detections(settings, num_classes, k)
    threshold, iou = float(settings["score_threshold"]), float(settings["nms_iou_threshold"])
    out = {"boxes": torch.zeros(batch, limit, 4), "scores": torch.zeros(batch, limit),
           "labels": torch.full((batch, limit), -1, dtype=torch.int64),
           "num_detections": torch.zeros(batch, dtype=torch.int64)}
    labels = torch.arange(num_classes)[:, None].expand(num_classes, k).reshape(-1)
    for b in range(batch):
        boxes, scores = candidate_boxes[b].reshape(-1, 4).float(), candidate_scores[b].reshape(-1).float()
        keep = scores > threshold
        kept = batched_nms(boxes[keep], scores[keep], labels[keep], iou)[:limit]
        n = kept.numel()
        out["boxes"][b, :n], out["scores"][b, :n] = boxes[keep][kept], scores[keep][kept]
        out["labels"][b, :n], out["num_detections"][b] = labels[keep][kept], n
    return out


def detections_to_results(outputs: Mapping[str, Tensor],
                          image_sizes: Sequence[Sequence[int]]) -> list[dict[str, Tensor]]:
    """Fixed-size outputs (normalised boxes) -> the head's predict() format, boxes in pixels of (h, w)."""
    results = []
    for b, (h, w) in enumerate(image_sizes):
        n = int(outputs["num_detections"][b])
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append({"boxes": outputs["boxes"][b, :n].float() * scale, "scores": outputs["scores"][b, :n].float(),
                        "labels": outputs["labels"][b, :n].to(torch.int64)})
    return results


def label_maps_to_results(labels: Tensor, image_sizes: Sequence[Sequence[int]],
                          valid_sizes: Sequence[Sequence[int]] | None = None) -> list[dict[str, Tensor]]:
    """Label maps at the input size -> per image {"mask" [h, w]}: the valid region, resized (nearest) to (h, w).

    The head resizes logits (bilinear) before the argmax; resizing the argmax is what a device does and may
    differ from it along class borders when (h, w) is not the input size."""
    results = []
    for b, (h, w) in enumerate(image_sizes):
        mask = labels[b]
        if valid_sizes is not None:
            vh, vw = (int(s) for s in valid_sizes[b])
            mask = mask[:vh, :vw]
        if tuple(mask.shape) != (int(h), int(w)):
            mask = F.interpolate(mask[None, None].float(), size=(int(h), int(w)), mode="nearest")[0, 0]
        results.append({"mask": mask.to(torch.int64)})
    return results


__all__ = ["CandidateDecoder", "LabelMap", "DetectionCandidates", "SegmentationLabels", "in_graph_wrapper",
           "select_detections", "detections_to_results", "label_maps_to_results", "FLOAT_MODULES", "from_modules",
           "type_name",
           "DETECTION_OUTPUTS", "CANDIDATE_OUTPUTS", "SEGMENTATION_OUTPUTS"]
