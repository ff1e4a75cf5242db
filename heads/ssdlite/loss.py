"""SSD's multibox loss: smooth-L1 on matched boxes + softmax cross-entropy with hard negative mining.

Everything runs on the whole batch at once (targets padded, see matcher.py). Two host syncs per call:
the label range check and selecting the kept anchors for the cross-entropy.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_coder import BoxCoder, cxcywh_to_xyxy
from .matcher import match, pad_targets, padded_box_iou


def hard_negative_mask(cls_loss: Tensor, positive: Tensor, neg_pos_ratio: float,
                       min_negatives: int) -> Tensor:
    """Per image, the max(neg_pos_ratio * #positives, min_negatives) negatives of highest loss [B, A].

    `min_negatives` is TF's `min_negatives_per_image` (3 in ssdlite_mobilenet_v2_coco), so an image
    without boxes still teaches background through its hardest anchors.
    """
    with torch.no_grad():
        num_pos = positive.sum(dim=1, keepdim=True)
        num_neg = torch.clamp(num_pos * neg_pos_ratio, min=min_negatives)
        num_neg = torch.minimum(num_neg, positive.shape[1] - num_pos)
        neg_loss = cls_loss.masked_fill(positive, -1.0)  # CE >= 0, so positives sort last
        order = neg_loss.argsort(dim=1, descending=True)
        rank_mask = torch.arange(positive.shape[1], device=positive.device)[None, :] < num_neg
        return torch.zeros_like(positive).scatter_(1, order, rank_mask)


def multibox_loss(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor,
                  targets: Sequence[dict[str, Tensor]], box_coder: BoxCoder, iou_threshold: float,
                  neg_pos_ratio: float, min_negatives: int) -> dict[str, Tensor]:
    """cls_logits [B, A, K+1] (0 = background), bbox_regression [B, A, 4], anchors [A, 4] cxcywh."""
    if len(targets) != cls_logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {cls_logits.shape[0]} images.")
    num_classes = cls_logits.shape[-1] - 1
    padded = pad_targets(targets, num_classes, cls_logits.device)
    gt_boxes, gt_labels = padded.boxes, padded.labels
    anchors = anchors.to(gt_boxes.dtype)
    with torch.no_grad():
        matches = match(padded_box_iou(padded, cxcywh_to_xyxy(anchors)), padded.valid, iou_threshold)
    positive = matches >= 0
    matched = matches.clamp(min=0)
    matched_boxes = torch.gather(gt_boxes, 1, matched[..., None].expand(-1, -1, 4))  # [B, A, 4]
    cls_target = torch.where(positive, torch.gather(gt_labels, 1, matched) + 1, 0)
    num_pos = positive.sum().clamp(min=1).float()

    box_target = box_coder.encode(matched_boxes, anchors[None])
    # Unmatched anchors get arbitrary (possibly inf) targets; zero them before the loss.
    box_target = torch.where(positive[..., None], box_target, bbox_regression.detach())
    box_loss = F.smooth_l1_loss(bbox_regression.float(), box_target.float(), reduction="none").sum(-1)
    loss_box = (box_loss * positive).sum() / num_pos

    # Mining needs every anchor's background loss, but the loss itself only the kept anchors
    # (positives + 3x as many negatives): the softmax backward then runs on ~1% of the anchors.
    with torch.no_grad():
        background_loss = -F.log_softmax(cls_logits.float(), dim=-1)[..., 0]
        keep = positive | hard_negative_mask(background_loss, positive, neg_pos_ratio, min_negatives)
        kept = keep.nonzero(as_tuple=True)
    loss_cls = F.cross_entropy(cls_logits[kept].float(), cls_target[kept], reduction="sum") / num_pos
    return {"loss_box": loss_box, "loss_cls": loss_cls}
