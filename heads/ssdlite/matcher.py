"""Batched SSD matching: ground-truth boxes padded to [B, G, 4] with a validity mask, no loop per image."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


class PaddedTargets(NamedTuple):
    boxes: Tensor       # [B, G, 4] normalised xyxy, zeros where padded
    labels: Tensor      # [B, G] int64 0..K-1, zeros where padded
    valid: Tensor       # [B, G] bool
    flat_index: Tensor  # [N] position in B * G of each real box, image by image


def pad_targets(targets: Sequence[dict[str, Tensor]], num_classes: int, device: torch.device) -> PaddedTargets:
    """Stack per-image boxes [N_i, 4] / labels [N_i] into a padded batch with G = max(1, max N_i)."""
    boxes, labels = [], []
    for i, target in enumerate(targets):
        b, lab = target["boxes"], target["labels"]
        if b.dim() != 2 or b.shape[-1] != 4 or lab.dim() != 1 or lab.shape[0] != b.shape[0]:
            raise ValueError(f"targets[{i}] has boxes of shape {tuple(b.shape)} and labels of shape "
                             f"{tuple(lab.shape)}; expected boxes [N, 4] (normalised xyxy) and labels [N].")
        boxes.append(b.to(device=device, dtype=torch.float32))
        labels.append(lab.to(device=device, dtype=torch.int64))
    all_labels = torch.cat(labels)
    bad = (all_labels < 0) | (all_labels >= num_classes)
    if bad.any():
        raise ValueError(f"target label {int(all_labels[bad][0])} is outside 0..{num_classes - 1} "
                         f"(head.num_classes={num_classes}).")
    counts_list = [len(lab) for lab in labels]
    max_count, total = max([1] + counts_list), sum(counts_list)
    padded_boxes = pad_sequence(boxes + [boxes[0].new_zeros(max_count, 4)], batch_first=True)[:-1]
    padded_labels = pad_sequence(labels + [labels[0].new_zeros(max_count)], batch_first=True)[:-1]
    counts = torch.tensor(counts_list, device=device)
    valid = torch.arange(max_count, device=device)[None, :] < counts[:, None]
    # Shapes are known on the host, so this needs no device sync (unlike valid.nonzero()).
    image = torch.repeat_interleave(torch.arange(len(labels), device=device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    flat_index = image * max_count + torch.arange(total, device=device) - starts[image]
    return PaddedTargets(padded_boxes, padded_labels, valid, flat_index)


def box_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of xyxy boxes [..., G, 4] with xyxy anchors [A, 4] -> [..., G, A]."""
    x1, y1, x2, y2 = boxes.unsqueeze(-1).unbind(-2)
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)
    inter = (torch.minimum(x2, ax2) - torch.maximum(x1, ax1)).clamp_(min=0)
    inter.mul_((torch.minimum(y2, ay2) - torch.maximum(y1, ay1)).clamp_(min=0))
    union = (x2 - x1) * (y2 - y1) + (ax2 - ax1) * (ay2 - ay1) - inter
    return inter.div_(union)


def padded_box_iou(targets: PaddedTargets, anchors: Tensor) -> Tensor:
    """[B, G, A] IoU with anchors (xyxy), -1 for padded rows; only the real boxes are computed."""
    batch, num_gt, _ = targets.boxes.shape
    iou = targets.boxes.new_full((batch * num_gt, anchors.shape[0]), -1.0)
    real = targets.boxes.view(-1, 4).index_select(0, targets.flat_index)
    iou.index_copy_(0, targets.flat_index, box_iou(real, anchors))
    return iou.view(batch, num_gt, -1)


def match(iou: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Index of the matched ground truth per anchor [B, A], -1 for background.

    An anchor matches its best box when IoU >= threshold; then every valid box also takes its own best
    anchor (torchvision's SSDMatcher). When two boxes share a best anchor, the later box keeps it, as
    torchvision's in-place assignment does.
    """
    batch, num_gt, num_anchors = iou.shape
    iou = iou.masked_fill(~valid[..., None], -1.0)
    best_iou, best_gt = iou.max(dim=1)
    matches = torch.where(best_iou >= threshold, best_gt, torch.full_like(best_gt, -1))
    best_anchor = iou.argmax(dim=2)  # [B, G]
    best_anchor = torch.where(valid, best_anchor, torch.full_like(best_anchor, num_anchors))  # dummy slot
    gt_index = torch.arange(num_gt, device=iou.device).expand(batch, num_gt)
    forced = torch.full((batch, num_anchors + 1), -1, dtype=torch.int64, device=iou.device)
    forced.scatter_reduce_(1, best_anchor, gt_index, reduce="amax")
    forced = forced[:, :num_anchors]
    return torch.where(forced >= 0, forced, matches)
