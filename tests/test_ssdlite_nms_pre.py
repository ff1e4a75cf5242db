"""The cap on NMS candidates (`nms_pre`) and the fast candidate selection against torchvision's
SSD.postprocess_detections, and against a by-hand reference when the cap cuts."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import batched_nms

import heads.ssdlite.postprocess as postprocess_module
from heads.ssdlite import BoxCoder, DefaultBoxes
from heads.ssdlite.box_coder import cxcywh_to_xyxy
from heads.ssdlite.postprocess import postprocess

GRIDS_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SETTINGS = dict(score_threshold=0.01, topk_candidates=300, nms_iou_threshold=0.55, detections_per_image=100)
SIZES = [(320, 320), (240, 400)]


def torchvision_detections(cls_logits, bbox_regression, anchors, image_sizes, settings):
    ssd = SimpleNamespace(box_coder=det_utils.BoxCoder(WEIGHTS), score_thresh=settings["score_threshold"],
                          topk_candidates=settings["topk_candidates"], nms_thresh=settings["nms_iou_threshold"],
                          detections_per_img=settings["detections_per_image"])
    pixel = [cxcywh_to_xyxy(anchors) * torch.tensor([w, h, w, h], dtype=anchors.dtype) for h, w in image_sizes]
    return SSD.postprocess_detections(ssd, {"cls_logits": cls_logits, "bbox_regression": bbox_regression}, pixel,
                                      image_sizes)


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert len(a["scores"]) == len(b["scores"])
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-5)
        assert torch.equal(a["labels"], b["labels"] - 1)


def outputs(kind: str, num_classes: int = 20, seed: int = 0):
    """Raw outputs that take each path of the candidate selection."""
    g = torch.Generator().manual_seed(seed)
    anchors = DefaultBoxes(6)(GRIDS_320)
    a = anchors.shape[0]
    logits = 3 * torch.randn(2, a, num_classes + 1, generator=g)
    regression = 0.5 * torch.randn(2, a, 4, generator=g)
    if kind == "sparse":  # a trained model: background wins almost everywhere, a few objects score
        logits = torch.randn(2, a, num_classes + 1, generator=g)
        logits[..., 0] += 10.0
        logits[:, :40, 3] += 12.0
    elif kind == "one_class":  # one class leads everywhere: more than topk_candidates of it in every prefix
        logits = torch.randn(2, a, num_classes + 1, generator=g)
        logits[..., 1] += 4.0
    elif kind == "overlapping":  # every box the same: NMS keeps one per class, the prefix must grow
        regression.zero_()
        anchors = torch.tensor([[0.5, 0.5, 0.4, 0.4]]).expand(a, 4).clone()
    return logits, regression, anchors


@pytest.mark.parametrize("kind", ["dense", "sparse", "one_class", "overlapping"])
@pytest.mark.parametrize("nms_pre", [None, 100_000])
def test_equals_torchvision_when_the_cap_is_not_reached(kind, nms_pre):
    logits, regression, anchors = outputs(kind)
    ours = postprocess(logits, regression, anchors, SIZES, BoxCoder(WEIGHTS), **SETTINGS, nms_pre=nms_pre)
    assert_same(ours, torchvision_detections(logits, regression, anchors, SIZES, SETTINGS))


def test_a_cap_equal_to_the_candidate_count_changes_nothing():
    logits, regression, anchors = outputs("dense")
    scores = F.softmax(logits, -1)[..., 1:]
    counts = (scores > 0.01).sum(1).clamp(max=300).sum(1)  # candidates per image under the per-class rule
    theirs = torchvision_detections(logits, regression, anchors, SIZES, SETTINGS)
    for b in range(2):
        ours = postprocess(logits[b:b + 1], regression[b:b + 1], anchors, SIZES[b:b + 1], BoxCoder(WEIGHTS),
                           **SETTINGS, nms_pre=int(counts[b]))
        assert_same(ours, theirs[b:b + 1])


def reference_with_cap(logits, regression, anchors, image_sizes, settings, nms_pre):
    """torchvision's rule written out, plus the cap: per-class top-k above the threshold, then the nms_pre best
    over all classes, class-wise NMS, the best detections_per_image."""
    results = []
    for b, (h, w) in enumerate(image_sizes):
        scores = F.softmax(logits[b], -1)[:, 1:]
        boxes = BoxCoder(WEIGHTS).decode(regression[b], anchors) * torch.tensor([w, h, w, h])
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        all_boxes, all_scores, all_labels = [], [], []
        for c in range(scores.shape[1]):
            s, i = scores[:, c].topk(settings["topk_candidates"])
            keep = s > settings["score_threshold"]
            all_boxes.append(boxes[i[keep]]), all_scores.append(s[keep])
            all_labels.append(torch.full((int(keep.sum()),), c))
        s, order = torch.cat(all_scores).topk(nms_pre)
        bx, lab = torch.cat(all_boxes)[order], torch.cat(all_labels)[order]
        kept = batched_nms(bx, s, lab, settings["nms_iou_threshold"])[:settings["detections_per_image"]]
        results.append({"boxes": bx[kept], "scores": s[kept], "labels": lab[kept] + 1})  # as torchvision's
    return results


@pytest.mark.parametrize("kind", ["dense", "one_class", "overlapping"])
def test_the_cap_keeps_the_best_candidates_and_bounds_nms(kind, monkeypatch):
    logits, regression, anchors = outputs(kind)
    nms_sizes = []
    classwise_nms = postprocess_module._classwise_nms

    def recording_nms(boxes, scores, idxs, iou_threshold):
        nms_sizes.append(len(boxes))
        return classwise_nms(boxes, scores, idxs, iou_threshold)

    monkeypatch.setattr(postprocess_module, "_classwise_nms", recording_nms)
    ours = postprocess(logits, regression, anchors, SIZES, BoxCoder(WEIGHTS), **SETTINGS, nms_pre=500)
    assert_same(ours, reference_with_cap(logits, regression, anchors, SIZES, SETTINGS, 500))
    assert nms_sizes and max(nms_sizes) <= 500
    if kind == "overlapping":  # one box survives per class: the prefix grew up to the cap
        assert max(nms_sizes) == 500 and len(ours[0]["scores"]) == 20


def test_negative_cap_is_refused():
    logits, regression, anchors = outputs("dense")
    with pytest.raises(ValueError, match="nms_pre=-1"):
        postprocess(logits, regression, anchors, SIZES, BoxCoder(WEIGHTS), **SETTINGS, nms_pre=-1)


def test_empty_image_and_empty_batch_item():
    logits, regression, anchors = outputs("sparse")
    logits[1, :, 0] = 50.0  # the second image: background everywhere, no candidate at all
    ours = postprocess(logits, regression, anchors, SIZES, BoxCoder(WEIGHTS), **SETTINGS, nms_pre=1000)
    assert_same(ours, torchvision_detections(logits, regression, anchors, SIZES, SETTINGS))
    assert len(ours[1]["scores"]) == 0 and ours[1]["boxes"].shape == (0, 4)


def test_the_sidecar_carries_the_cap_and_onnx_decoding_follows_it(tmp_path):
    """Interface 5: the export's decoding settings hold nms_pre, so decode_detections (ONNX Runtime, LiteRT)
    caps the candidates exactly as the PyTorch head does."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from tasks.deploy.onnx_runtime import decode_detections
    from tasks.deploy.sidecar import model_metadata
    from tasks.training.model import build_model

    conf = Path(__file__).resolve().parents[1] / "conf"
    head = OmegaConf.load(conf / "head" / "ssdlite.yaml")
    assert head.nms_pre == 1000
    head.nms_pre = 50  # far below the untrained model's 3 x 300 candidates: the cap decides
    backbone = OmegaConf.load(conf / "backbone" / "mobilenet_v2.yaml")
    backbone.width_mult = 0.25
    val = {"_target_": "tasks.detection.coco.CocoDetection", "image_dir": str(tmp_path / "absent"),
           "ann_file": str(tmp_path / "absent.json")}
    cfg = OmegaConf.create({"backbone": backbone, "head": head,
                            "dataset": {"task": "detection", "input_size": 128, "num_classes": 3, "val": val}})
    settings = model_metadata(cfg)["postprocess"]
    assert settings["nms_pre"] == 50
    torch.manual_seed(0)
    model = build_model(cfg.backbone, cfg.head, 3).eval()
    with torch.no_grad():
        raw = model(torch.randn(2, 3, 128, 128))
    sizes = [(128, 128), (100, 150)]
    ours, onnx_side = model.predict(raw, sizes), decode_detections({k: v.numpy() for k, v in raw.items()}, sizes,
                                                                   settings)
    for a, b in zip(ours, onnx_side, strict=True):
        assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["boxes"], b["boxes"])
    # an untrained model's scores nearly tie, so only the cap's bound is checked here (the exact cut above)
    best_50 = F.softmax(raw["cls_logits"][0], -1)[:, 1:].reshape(-1).topk(50).values
    assert len(ours[0]["scores"]) <= 50 and ours[0]["scores"].min() >= best_50[-1]
    uncapped = {**settings}
    del uncapped["nms_pre"]  # a sidecar written before the cap decodes without one
    assert len(decode_detections(raw, sizes, uncapped)[0]["scores"]) == 100 > len(ours[0]["scores"])
