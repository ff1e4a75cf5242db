"""From raw outputs to detections: decode, softmax, per-class top-k, class-wise NMS."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import BoxCoder


@torch.no_grad()
def postprocess(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor,
                image_sizes: Sequence[tuple[int, int]], box_coder: BoxCoder, score_threshold: float,
                topk_candidates: int, nms_iou_threshold: float, detections_per_image: int) -> list[dict]:
    """Same result as torchvision's SSD.postprocess_detections, with labels 0..K-1 (background dropped).

    A score must be strictly above `score_threshold` (torchvision's rule). The top-k per class is taken
    before thresholding, which keeps the same boxes as thresholding first, without a loop per class.
    """
    batch, num_anchors, _ = cls_logits.shape
    if len(image_sizes) != batch:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {batch} images.")
    device = cls_logits.device
    sizes = torch.as_tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32, device=device)
    boxes = box_coder.decode(bbox_regression.float(), anchors[None]) * sizes[:, None, :]  # [B, A, 4]
    boxes = torch.minimum(boxes.clamp(min=0), sizes[:, None, :])

    scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:].transpose(1, 2)  # [B, K, A]
    num_classes = scores.shape[1]
    scores, anchor_idx = scores.topk(min(topk_candidates, num_anchors), dim=2)  # [B, K, k], sorted
    labels = torch.arange(num_classes, device=device)[None, :, None].expand_as(anchor_idx)
    images = torch.arange(batch, device=device)[:, None, None].expand_as(anchor_idx)
    keep = scores > score_threshold
    scores, labels, images = scores[keep], labels[keep], images[keep]
    cand_boxes = boxes[images, anchor_idx[keep]]

    # NMS image by image: one batched_nms call over the whole batch would need class offsets so
    # large (image * K + label) that float32 box coordinates lose precision.
    per_image = torch.bincount(images, minlength=batch).tolist()
    results = []
    for b, s, lab in zip(cand_boxes.split(per_image), scores.split(per_image), labels.split(per_image)):
        kept = batched_nms(b, s, lab, nms_iou_threshold)[:detections_per_image]
        results.append({"boxes": b[kept], "scores": s[kept], "labels": lab[kept]})
    return results
