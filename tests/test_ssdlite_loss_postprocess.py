"""Box coding, matching, hard negative mining, loss and decoding against torchvision's SSD and hand cases."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from heads.ssdlite import BoxCoder, DefaultBoxes
from heads.ssdlite.box_coder import cxcywh_to_xyxy, xyxy_to_cxcywh
from heads.ssdlite.loss import hard_negative_mask, multibox_loss
from heads.ssdlite.matcher import box_iou as our_box_iou
from heads.ssdlite.matcher import match, pad_targets, padded_box_iou
from heads.ssdlite.postprocess import postprocess

GRIDS_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def random_boxes(n, generator, min_size=0.05, max_size=0.6):
    wh = min_size + (max_size - min_size) * torch.rand(n, 2, generator=generator)
    xy = torch.rand(n, 2, generator=generator) * (1 - wh)
    return torch.cat([xy, xy + wh], dim=1)


def random_targets(counts, num_classes, generator):
    return [{"boxes": random_boxes(n, generator), "labels": torch.randint(0, num_classes, (n,), generator=generator)}
            for n in counts]


def pixel_xyxy(cxcywh, height, width):
    return cxcywh_to_xyxy(cxcywh) * torch.tensor([width, height, width, height], dtype=cxcywh.dtype)


def test_encode_decode_identity_and_torchvision_codes():
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder(WEIGHTS)
    anchors = xyxy_to_cxcywh(random_boxes(500, g))
    boxes = random_boxes(500, g)
    codes = coder.encode(boxes, anchors)
    torch.testing.assert_close(coder.decode(codes, anchors), boxes, atol=1e-6, rtol=0)
    expected = det_utils.BoxCoder(WEIGHTS).encode_single(boxes, cxcywh_to_xyxy(anchors))
    torch.testing.assert_close(codes, expected, atol=1e-4, rtol=1e-4)
    # Batched: [B, A, 4] codes against [A, 4] anchors.
    torch.testing.assert_close(coder.decode(codes.view(5, 100, 4), anchors.view(5, 100, 4)), boxes.view(5, 100, 4),
                               atol=1e-6, rtol=0)


def test_matching_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.0, 0.0, 0.5, 0.6]])
    # GT 0 is anchor 0 (IoU 1) and covers anchor 3 with IoU 0.25 / 0.30 = 0.83 (a match by threshold).
    # GT 1 overlaps anchor 2 with IoU 0.08 / 0.29 = 0.28 < 0.5 and anchor 3 with 0.02 / 0.40 = 0.05, so only
    # the force-match gives it anchor 2. Anchor 1 stays background. Image 2 has no boxes.
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.3, 0.5, 0.6, 0.9]]), "labels": torch.tensor([4, 7])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    padded = pad_targets(targets, 10, torch.device("cpu"))
    valid = padded.valid
    assert valid.tolist() == [[True, True], [False, False]] and padded.labels[0].tolist() == [4, 7]
    iou = padded_box_iou(padded, anchors)
    assert (iou[1] == -1).all()
    torch.testing.assert_close(iou[0], torch.tensor([[1.0, 0.0, 0.0, 0.25 / 0.3], [0.0, 0.0, 0.08 / 0.29, 0.05]]))
    assert match(iou, valid, 0.5).tolist() == [[0, -1, 1, 0], [-1, -1, -1, -1]]
    # At threshold 0.9 anchor 3 drops out; the force-matches (anchor 0 -> GT 0, anchor 2 -> GT 1) stay.
    assert match(iou, valid, 0.9).tolist() == [[0, -1, 1, -1], [-1, -1, -1, -1]]


def test_two_boxes_sharing_their_best_anchor():
    anchors = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.1, 0.1]])
    boxes = torch.tensor([[[0.0, 0.0, 0.9, 0.9], [0.05, 0.05, 0.95, 0.95]]])
    iou = our_box_iou(boxes, anchors)
    got = match(iou, torch.ones(1, 2, dtype=torch.bool), 0.5)
    expected = det_utils.SSDMatcher(0.5)(box_iou(boxes[0], anchors))
    assert got[0].tolist() == expected.tolist() == [1, -1]


def test_batched_matching_equals_torchvision_ssd_matcher():
    g = torch.Generator().manual_seed(1)
    anchors = cxcywh_to_xyxy(DefaultBoxes(6)(GRIDS_320))
    targets = random_targets([5, 0, 12, 1], 3, g)
    padded = pad_targets(targets, 3, torch.device("cpu"))
    iou = padded_box_iou(padded, anchors)
    got = match(iou, padded.valid, 0.5)
    for i, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            assert (got[i] == -1).all()
            continue
        torch.testing.assert_close(iou[i, :len(t["boxes"])], box_iou(t["boxes"], anchors))
        expected = det_utils.SSDMatcher(0.5)(box_iou(t["boxes"], anchors))
        assert torch.equal(got[i], expected), i


def test_hard_negatives_are_three_times_positives_and_hardest():
    g = torch.Generator().manual_seed(2)
    cls_loss = torch.rand(3, 200, generator=g)
    positive = torch.zeros(3, 200, dtype=torch.bool)
    positive[0, :7] = True    # 7 positives -> 21 negatives
    positive[1, 50:90] = True  # 40 positives -> only 160 negatives exist
    # image 2: no positives -> the 3 hardest anchors (min_negatives_per_image)
    mask = hard_negative_mask(cls_loss, positive, 3.0, 3)
    assert mask.sum(1).tolist() == [21, 120, 3]
    assert not (mask & positive).any()
    for i in range(3):
        negatives = cls_loss[i][~positive[i]]
        chosen = cls_loss[i][mask[i]]
        assert torch.equal(chosen.sort(descending=True).values, negatives.sort(descending=True).values[:len(chosen)])


def matched_indices(targets, anchors):
    """torchvision's SSDMatcher per image; an empty image gets all -1 as SSD.forward does."""
    matcher, anchors_xyxy = det_utils.SSDMatcher(0.5), cxcywh_to_xyxy(anchors)
    return [matcher(box_iou(t["boxes"], anchors_xyxy)) if len(t["boxes"])
            else torch.full((len(anchors),), -1, dtype=torch.int64) for t in targets]


def torchvision_loss(cls_logits, bbox_regression, anchors, targets, height=320, width=320):
    """SSD.compute_loss on the same inputs, in torchvision's pixel coordinates and 1-based labels."""
    pixel_anchors = pixel_xyxy(anchors, height, width)
    scale = torch.tensor([width, height, width, height])
    tv_targets = [{"boxes": t["boxes"] * scale, "labels": t["labels"] + 1} for t in targets]
    # Matched on normalised boxes (IoU is scale-free): in pixels, exact IoU ties (a box containing two
    # anchors of equal area) can break the other way through rounding.
    matched = matched_indices(targets, anchors)
    fake_ssd = SimpleNamespace(box_coder=det_utils.BoxCoder(WEIGHTS), neg_to_pos_ratio=3.0)
    out = {"cls_logits": cls_logits, "bbox_regression": bbox_regression}
    return SSD.compute_loss(fake_ssd, tv_targets, out, [pixel_anchors] * len(targets), matched)


def test_loss_equals_torchvision_compute_loss():
    g = torch.Generator().manual_seed(3)
    anchors = DefaultBoxes(6)(GRIDS_320)
    num_anchors, num_classes = anchors.shape[0], 6
    cls_logits = torch.randn(3, num_anchors, num_classes + 1, generator=g)
    bbox_regression = torch.randn(3, num_anchors, 4, generator=g)
    targets = random_targets([4, 1, 9], num_classes, g)
    ours = multibox_loss(cls_logits, bbox_regression, anchors, targets, BoxCoder(WEIGHTS), 0.5, 3.0, 3)
    theirs = torchvision_loss(cls_logits, bbox_regression, anchors, targets)
    torch.testing.assert_close(ours["loss_box"], theirs["bbox_regression"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["loss_cls"], theirs["classification"], rtol=1e-4, atol=1e-5)


def test_images_without_boxes():
    g = torch.Generator().manual_seed(4)
    anchors = DefaultBoxes(6)(GRIDS_320)
    cls_logits = torch.randn(3, anchors.shape[0], 5, generator=g, requires_grad=True)
    bbox_regression = torch.randn(3, anchors.shape[0], 4, generator=g, requires_grad=True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    coder = BoxCoder(WEIGHTS)
    # A batch without any box: no box loss; each image contributes its 3 hardest background anchors.
    losses = multibox_loss(cls_logits, bbox_regression, anchors, [empty] * 3, coder, 0.5, 3.0, 3)
    background_ce = F.cross_entropy(cls_logits.detach().transpose(1, 2), torch.zeros(3, anchors.shape[0],
                                                                                      dtype=torch.int64),
                                    reduction="none")
    assert losses["loss_box"].item() == 0.0
    torch.testing.assert_close(losses["loss_cls"], background_ce.topk(3, dim=1).values.sum())
    sum(losses.values()).backward()
    assert torch.isfinite(cls_logits.grad).all() and torch.isfinite(bbox_regression.grad).all()
    # Mixed batch: torchvision's loss (which skips the empty image) + the empty image's 3 hardest / #positives.
    targets = random_targets([3, 0, 5], 4, g)
    ours = multibox_loss(cls_logits.detach(), bbox_regression.detach(), anchors, targets, coder, 0.5, 3.0, 3)
    theirs = torchvision_loss(cls_logits.detach(), bbox_regression.detach(), anchors, targets)
    num_pos = sum((m >= 0).sum() for m in matched_indices(targets, anchors))
    extra = background_ce[1].topk(3).values.sum() / num_pos
    torch.testing.assert_close(ours["loss_box"], theirs["bbox_regression"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["loss_cls"], theirs["classification"] + extra, rtol=1e-4, atol=1e-5)


def test_bad_targets_raise():
    anchors = DefaultBoxes(6)(GRIDS_320)
    logits, regression = torch.zeros(1, anchors.shape[0], 4), torch.zeros(1, anchors.shape[0], 4)
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        multibox_loss(logits, regression, anchors, [{"boxes": torch.rand(1, 4), "labels": torch.tensor([3])}],
                      BoxCoder(), 0.5, 3.0, 3)
    with pytest.raises(ValueError, match=r"targets\[0\] has boxes of shape \(4,\)"):
        multibox_loss(logits, regression, anchors, [{"boxes": torch.rand(4), "labels": torch.tensor([1])}],
                      BoxCoder(), 0.5, 3.0, 3)


def test_postprocess_equals_torchvision():
    g = torch.Generator().manual_seed(5)
    anchors = DefaultBoxes(6)(GRIDS_320)
    num_anchors, num_classes = anchors.shape[0], 20
    cls_logits = 3 * torch.randn(2, num_anchors, num_classes + 1, generator=g)
    bbox_regression = 0.5 * torch.randn(2, num_anchors, 4, generator=g)
    image_sizes = [(320, 320), (240, 400)]
    settings = dict(score_threshold=0.01, topk_candidates=300, nms_iou_threshold=0.55, detections_per_image=100)
    ours = postprocess(cls_logits, bbox_regression, anchors, image_sizes, BoxCoder(WEIGHTS), **settings)
    fake_ssd = SimpleNamespace(box_coder=det_utils.BoxCoder(WEIGHTS), score_thresh=0.01, topk_candidates=300,
                               nms_thresh=0.55, detections_per_img=100)
    theirs = SSD.postprocess_detections(fake_ssd, {"cls_logits": cls_logits, "bbox_regression": bbox_regression},
                                        [pixel_xyxy(anchors, h, w) for h, w in image_sizes], image_sizes)
    for (h, w), a, b in zip(image_sizes, ours, theirs):
        assert len(a["scores"]) == len(b["scores"]) == 100
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"] - 1)
        assert a["labels"].dtype == torch.int64
        assert (a["boxes"][:, 0::2] <= w).all() and (a["boxes"][:, 1::2] <= h).all() and (a["boxes"] >= 0).all()
    # Few survivors: a high threshold leaves some images with fewer than detections_per_image (or none).
    settings["score_threshold"] = 0.995
    fake_ssd.score_thresh = 0.995
    ours = postprocess(cls_logits, bbox_regression, anchors, image_sizes, BoxCoder(WEIGHTS), **settings)
    theirs = SSD.postprocess_detections(fake_ssd, {"cls_logits": cls_logits, "bbox_regression": bbox_regression},
                                        [pixel_xyxy(anchors, h, w) for h, w in image_sizes], image_sizes)
    for a, b in zip(ours, theirs):
        assert len(a["scores"]) == len(b["scores"]) < 100
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-5)
        assert torch.equal(a["labels"], b["labels"] - 1)
