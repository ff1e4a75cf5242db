"""From raw outputs to detections: softmax, candidate selection, decode, class-wise NMS.

The result is torchvision's SSD.postprocess_detections (labels 0..K-1, background dropped): per class the
`topk_candidates` best anchors whose score is strictly above `score_threshold`, class-wise NMS, the
`detections_per_image` best. `nms_pre` (mmdetection's name) caps the candidates that enter NMS at the
`nms_pre` best over all (anchor, class) pairs; it changes nothing while fewer candidates pass.

Three exact shortcuts keep the usual and the worst case cheap:
- an anchor can only give a candidate if its best class logit beats the background logit by
  log(score_threshold) (the softmax score is at most exp(class logit - background logit)): the softmax,
  threshold, counts and ranking run on those anchors' rows only, usually a few hundred of thousands of pairs;
- the candidates are taken in score order from one flat top-k over all pairs (or the few pairs above the
  threshold); a prefix of at most `topk_candidates` pairs can never hold more than `topk_candidates` of
  one class, so the per-class top-k only has to run when a longer prefix breaks it;
- greedy NMS decides each box from the higher-scoring boxes alone, so NMS over the best `n` candidates
  keeps exactly the boxes full NMS keeps among them: once it keeps `detections_per_image`, those are the
  final detections. NMS starts with a short prefix and grows it only while too few boxes survive.
Only the anchors of the candidates are decoded.

The scores and boxes come from the raw outputs (eager PyTorch), or ready-made from a graph that ends in them
(an ONNX export's decode_in_graph outputs): the same numbers enter the same selection, so the same detections.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import BoxCoder

# The first NMS prefix, in multiples of detections_per_image, and its growth factor.
_FIRST_PREFIX = 2
_GROWTH = 4
# Up to this many pairs above the threshold, sorting them beats a top-k over every pair.
_SORT_ALL = 4096
# One image's candidate rows: (anchor indices [R], scores [R, K], best score [R], pairs above the threshold
# [R, K], how many, and when already at hand those pairs' flat indices into scores [R * K] and their scores).
_Rows = tuple[Tensor, Tensor, Tensor, Tensor, int, tuple[Tensor, Tensor] | None]


def _ranked_candidates(scores: Tensor, rows: Tensor, row_best: Tensor, above: Tensor, num_above: int,
                       pairs: tuple[Tensor, Tensor] | None, score_threshold: float, topk_candidates: int,
                       count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `count` best (anchor, class) pairs of one image that pass the per-class top-k and the threshold,
    in descending score order: (scores [n], anchors [n], classes [n]). `scores` [R, K] are the image's rows
    `rows` [R] that hold some pair above the threshold (`row_best` [R] their best score, `above` [R, K],
    `num_above` of them; `pairs`: their flat indices and scores, or None to find them here)."""
    num_rows, num_classes = scores.shape
    if num_above <= max(count, _SORT_ALL):  # few pairs pass the threshold: sort those, no top-k over all pairs
        if pairs is None:
            index = above.view(-1).nonzero().squeeze(1)
            pairs = index, scores.view(-1)[index]
        index, values = pairs
        values, order = values.sort(descending=True)
        values, index = values[:count], index[order[:count]]
        position, classes = index // num_classes, index % num_classes  # the pairs' rows in `scores`, their classes
    elif count < num_rows:
        # The best `count` pairs lie on the `count` rows with the best class scores (each of those rows holds
        # a pair at least as good as the count-th best row's), so the top-k runs on those rows only.
        best = row_best.topk(count).indices
        values, sub = scores[best].view(-1).topk(count)
        position, classes = best[sub // num_classes], sub % num_classes
    else:
        values, index = scores.view(-1).topk(count)
        position, classes = index // num_classes, index % num_classes
    if count <= topk_candidates or int(torch.bincount(classes).max()) <= topk_candidates:
        return values, rows[position], classes
    # Some class has more than topk_candidates pairs among them: apply the per-class top-k first.
    per_class, row = scores.t().topk(min(topk_candidates, num_rows), dim=1)  # [K, k]
    keep = per_class > score_threshold
    classes = torch.arange(num_classes, device=scores.device)[:, None].expand_as(row)[keep]
    values, order = per_class[keep].sort(descending=True)
    order = order[:count]
    return values[:count], rows[row[keep][order]], classes[order]


def _candidate_total(above: Tensor, num_above: int, topk_candidates: int, nms_pre: int | None) -> int:
    """The pairs above the threshold (`above` [R, K], `num_above` of them) under the per-class top-k, then the cap."""
    total = num_above
    if num_above > topk_candidates:
        total = int(torch.count_nonzero(above, dim=0).clamp(max=topk_candidates).sum())
    return min(total, nms_pre) if nms_pre else total


def foreground_scores(cls_logits: Tensor) -> Tensor:
    """[..., K + 1] logits -> [..., K] softmax scores, background (column 0) dropped. An ONNX export's graph
    ends in the same call (`class_scores`, tasks/deploy/onnx_export.py), so both forms decode the same numbers."""
    return F.softmax(cls_logits.float(), dim=-1)[..., 1:]


def _rows_from_logits(logits: Tensor, hit: Tensor, score_threshold: float) -> _Rows:
    """One image's [A, K + 1] logits and its anchors that may hold a candidate (`hit` [A]) -> (rows [R] that do
    hold a pair above the threshold, their scores [R, K], their best score [R], which pairs are above it
    [R, K], how many)."""
    rows = hit.nonzero().squeeze(1)
    scores = foreground_scores(logits[rows])
    best = scores.amax(dim=1)
    passing = best > score_threshold
    if not bool(passing.all()):
        rows, scores, best = rows[passing], scores[passing], best[passing]
    above = scores > score_threshold
    return rows, scores.contiguous(), best, above, int(torch.count_nonzero(above)), None


def _rows_from_scores(scores: Tensor, best: Tensor, score_threshold: float) -> _Rows:
    """One image's [A, K] scores and best score per anchor [A] (on the CPU) -> what `_rows_from_logits` gives.
    Only selections and comparisons, so numpy runs them: the same numbers for a fraction of the per-call cost of
    PyTorch's ops right after a runtime returns its outputs (benchmarks/postprocess.py)."""
    scores_np, best_np = scores.detach().float().numpy(), best.detach().float().numpy()
    threshold = np.float32(score_threshold)  # PyTorch compares a float32 tensor with a Python float in float32
    rows = np.flatnonzero(best_np > threshold)
    if len(rows) < len(best_np):
        scores_np, best_np = scores_np[rows], best_np[rows]
    scores_np, above = np.ascontiguousarray(scores_np), scores_np > threshold
    num_above = int(np.count_nonzero(above))
    pairs = None
    if num_above <= _SORT_ALL:  # the pairs the ranking sorts (the row-major order of PyTorch's nonzero())
        index = np.flatnonzero(above)
        pairs = torch.from_numpy(index), torch.from_numpy(scores_np.reshape(-1)[index])
    return (torch.from_numpy(rows), torch.from_numpy(scores_np), torch.from_numpy(best_np), torch.from_numpy(above),
            num_above, pairs)


def _classwise_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's batched_nms. On the CPU, up to its own cut-over, its coordinate trick (every class shifted
    past the others) is inlined here in numpy: the same float32 arithmetic, hence the same boxes kept, without
    its per-call logging and five small PyTorch ops."""
    if boxes.numel() > 4000 or boxes.device.type != "cpu" or boxes.numel() == 0:
        return batched_nms(boxes, scores, labels, iou_threshold)
    coordinates = boxes.numpy()
    offsets = labels.numpy().astype(np.float32) * (coordinates.max() + np.float32(1))
    return torch.ops.torchvision.nms(torch.from_numpy(coordinates + offsets[:, None]), scores, iou_threshold)


@torch.no_grad()
def postprocess(cls_logits: Tensor | None, bbox_regression: Tensor, anchors: Tensor,
                image_sizes: Sequence[tuple[int, int]], box_coder: BoxCoder, score_threshold: float,
                topk_candidates: int, nms_iou_threshold: float, detections_per_image: int,
                nms_pre: int | None = None, class_scores: Tensor | None = None,
                best_class_score: Tensor | None = None, anchor_boxes: Tensor | None = None) -> list[dict]:
    """Per image {"boxes": xyxy pixels of (h, w), clipped, "scores", "labels" 0..K-1}, best first.

    A score must be strictly above `score_threshold` (torchvision's rule). `nms_pre` (None or 0: no cap)
    bounds the candidates that enter NMS; below it the result is torchvision's. The scores come from
    `cls_logits` [B, A, K + 1], or ready-made: `class_scores` [B, A, K] (`foreground_scores` of the logits) and
    `best_class_score` [B, A] (their maximum per anchor), as an ONNX graph that ends in them gives. The boxes
    come from `bbox_regression` and `anchors`, or ready-made: `anchor_boxes` [B, A, 4], every anchor's box
    decoded (`box_coder.decode`, xyxy in the anchors' units). Both forms give the same detections.
    """
    batch = len(cls_logits if cls_logits is not None else class_scores)
    if len(image_sizes) != batch:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {batch} images.")
    if nms_pre is not None and nms_pre < 0:
        raise ValueError(f"nms_pre={nms_pre} must be a positive number of candidates, or 0/None for no cap.")
    from_scores = class_scores is not None and best_class_score is not None
    if not from_scores and cls_logits is None:
        raise ValueError("postprocess needs cls_logits, or class_scores and best_class_score.")
    device = bbox_regression.device
    if not from_scores:
        logits = cls_logits.float()
        # A class's softmax score is at most exp(its logit - the background logit) (the sum over classes exceeds
        # the background's term), so only anchors whose best class logit exceeds the background's by
        # log(score_threshold) can hold a candidate. In the usual case that leaves a few hundred of thousands of
        # pairs: the softmax, the threshold, the counts and the ranking run on those rows alone, with the same
        # values a softmax over every row gives.
        margin = math.log(score_threshold) if score_threshold > 0 else -math.inf
        row_hit = logits[..., 1:].amax(dim=2) > logits[..., 0] + margin  # [B, A]
    # numpy builds the small table in a few microseconds, torch.as_tensor of nested lists in tens of them
    image_scale = torch.from_numpy(np.array([[w, h, w, h] for h, w in image_sizes], dtype=np.float32)).to(device)

    results = []
    for b in range(batch):
        if from_scores:
            candidates = _rows_from_scores(class_scores[b], best_class_score[b], score_threshold)
        else:
            candidates = _rows_from_logits(logits[b], row_hit[b], score_threshold)
        rows, kept_scores, row_best, above, num_above, pairs = candidates

        # The total is at least min(num_above, topk_candidates, nms_pre) (one class past the top-k alone gives
        # topk_candidates), so the usual first prefix needs no per-class count; it is counted when NMS asks for more.
        first = _FIRST_PREFIX * detections_per_image
        total = None
        if first > min(num_above, topk_candidates, nms_pre or num_above):
            total = _candidate_total(above, num_above, topk_candidates, nms_pre)
        count = first if total is None else min(total, first)
        size = image_scale[b]
        while True:
            values, anchor, labels = _ranked_candidates(kept_scores, rows, row_best, above, num_above, pairs,
                                                        score_threshold, topk_candidates, count)
            if anchor_boxes is None:
                boxes = box_coder.decode(bbox_regression[b, anchor].float(), anchors[anchor]) * size
            else:
                boxes = anchor_boxes[b, anchor].float() * size
            boxes = torch.minimum(boxes.clamp(min=0), size)
            kept = _classwise_nms(boxes, values, labels, nms_iou_threshold)
            if len(kept) >= detections_per_image:
                break
            if total is None:
                total = _candidate_total(above, num_above, topk_candidates, nms_pre)
            if count >= total:
                break
            count = min(total, count * _GROWTH)
        kept = kept[:detections_per_image]
        results.append({"boxes": boxes[kept], "scores": values[kept], "labels": labels[kept]})
    return results
