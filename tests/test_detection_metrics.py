"""COCO metrics against pycocotools run directly on the same detections file; VOC AP against hand-computed
values and the devkit's +1 box convention."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.detection.coco import CocoDetection
from tasks.detection.coco_eval import STAT_NAMES, CocoEvaluator
from tasks.detection.voc import VOCDetection
from tasks.detection.voc_eval import VOCEvaluator, average_precision, box_iou

# ----------------------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco_ds(shared_data: Path) -> CocoDetection:
    root = shared_data / "coco128"
    return CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json")


@pytest.fixture(scope="module")
def detections_file(coco_ds, tmp_path_factory) -> Path:
    """A fixed, imperfect detector: GT boxes (crowd ones too) jittered, ~20% dropped, ~10% with a wrong
    class, plus 0-3 random false positives per image; seeded."""
    rng = np.random.default_rng(0)
    raw = coco_ds.coco.dataset
    cats = [c["id"] for c in raw["categories"]]
    sizes = {i["id"]: (i["width"], i["height"]) for i in raw["images"]}
    dets = []
    for ann in raw["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = ann["bbox"]
        jx, jy, jw, jh = rng.normal(0.0, 0.08, size=4)
        box = [x + jx * w, y + jy * h, max(w * (1 + jw), 1.0), max(h * (1 + jh), 1.0)]
        cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        dets.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box, "score": float(rng.random())})
    for image_id, (w, h) in sizes.items():
        for _ in range(int(rng.integers(0, 4))):
            bw, bh = rng.uniform(5, w / 2), rng.uniform(5, h / 2)
            box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]
            dets.append(
                {"image_id": image_id, "category_id": int(rng.choice(cats)), "bbox": box, "score": 0.3 * rng.random()}
            )
    path = tmp_path_factory.mktemp("coco_dets") / "detections.json"
    path.write_text(json.dumps(dets))
    return path


def pycocotools_stats(coco_gt: COCO, path: Path, image_ids: list[int] | None = None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(str(path))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def feed(evaluator: CocoEvaluator, ds: CocoDetection, dets: list[dict], image_ids: list[int]) -> None:
    """Hand the detections to the evaluator the way the engine would: per image, xyxy pixels, labels 0..K-1,
    torch tensors, in batches of 4."""
    per_image: dict[int, list[dict]] = {i: [] for i in image_ids}
    for d in dets:
        if d["image_id"] in per_image:
            per_image[d["image_id"]].append(d)
    targets, preds = [], []
    for image_id, items in per_image.items():
        xywh = np.array([d["bbox"] for d in items], np.float64).reshape(-1, 4)
        targets.append({"image_id": image_id, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        preds.append(
            {
                "boxes": torch.from_numpy(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)),
                "scores": torch.tensor([d["score"] for d in items], dtype=torch.float64),
                "labels": torch.tensor([ds.cat_id_to_label[d["category_id"]] for d in items], dtype=torch.int64),
            }
        )
    for i in range(0, len(targets), 4):
        evaluator.update(targets[i : i + 4], preds[i : i + 4])


def test_coco_evaluator_matches_pycocotools(coco_ds, detections_file, tmp_path, capsys):
    dets = json.loads(detections_file.read_text())
    ev = coco_ds.evaluator()
    assert ev.primary == "AP"
    feed(ev, coco_ds, dets, coco_ds.image_ids)
    ours = ev.compute()
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 6 and printed.count("Average Recall") == 6
    expected = pycocotools_stats(coco_ds.coco, detections_file)
    assert list(ours) == list(STAT_NAMES)
    np.testing.assert_allclose([ours[k] for k in STAT_NAMES], expected, rtol=0, atol=1e-9)
    assert 0.2 < ours["AP"] < 0.9  # an imperfect detector, not a degenerate case

    # the results json round-trips: same detections back in COCO format, and the same 12 numbers from it
    written = ev.write_results(tmp_path / "out" / "results.json")
    back = json.loads(written.read_text())
    assert len(back) == len(dets)
    key = lambda d: (d["image_id"], d["score"])  # noqa: E731
    for a, b in zip(sorted(back, key=key), sorted(dets, key=key), strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-12)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-9)
    np.testing.assert_allclose(pycocotools_stats(coco_ds.coco, written), expected, atol=1e-9)


def test_coco_evaluator_scores_only_images_seen_and_merges(coco_ds, detections_file):
    dets = json.loads(detections_file.read_text())
    ids = coco_ds.image_ids
    first, second = ids[: len(ids) // 3], ids[len(ids) // 3 : 2 * len(ids) // 3]
    subset_file = detections_file.parent / "subset.json"
    subset_file.write_text(json.dumps([d for d in dets if d["image_id"] in set(first + second)]))
    expected = pycocotools_stats(coco_ds.coco, subset_file, image_ids=sorted(first + second))

    a, b = coco_ds.evaluator(), coco_ds.evaluator()
    feed(a, coco_ds, dets, first)
    feed(b, coco_ds, dets, second + first[:5])  # padding-style repeats of images `a` already holds
    with contextlib.redirect_stdout(io.StringIO()):
        single = coco_ds.evaluator()
        feed(single, coco_ds, dets, first + second)
        feed(single, coco_ds, dets, first[:3])  # an image seen twice counts once
        np.testing.assert_allclose(list(single.compute().values()), expected, atol=1e-9)
        a.merge([b.state()])
        merged = a.compute()
    np.testing.assert_allclose(list(merged.values()), expected, atol=1e-9)
    assert sorted(a.state()["image_ids"]) == sorted(first + second)


def test_coco_evaluator_without_detections_returns_zeros(coco_ds, capsys):
    ev = coco_ds.evaluator()
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev.update([{"image_id": coco_ds.image_ids[0]}], [empty])
    assert ev.compute() == dict.fromkeys(STAT_NAMES, 0.0)
    assert "no detections" in capsys.readouterr().out
    assert coco_ds.evaluator().compute()["AP"] == 0.0


def test_coco_evaluator_rejects_bad_predictions(coco_ds):
    ev = coco_ds.evaluator()
    pred = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([80])}
    with pytest.raises(ValueError, match="outside 0..79"):
        ev.update([{"image_id": coco_ds.image_ids[0]}], [pred])
    with pytest.raises(ValueError, match="not in the ground-truth"):
        ev.update([{"image_id": 123456789}], [pred])


# ------------------------------------------------------------------------------------------------ VOC

CLASSES = ["cat", "dog", "bird"]


def hand_case() -> tuple[dict, list[dict], list[dict]]:
    """Image 0: cat A [0,0,10,10], cat [20,20,30,30] DIFFICULT, dog [0,0,10,10]. Image 1: cats B [50,50,60,60]
    and C [70,70,80,80]. No birds. npos(cat) = 3 (the difficult one does not count), npos(dog) = 1.

    cat detections by score:
      0.9 img0 [0,0,10,10]    IoU 1 with A            TP   tp=1 fp=0  rec 1/3 prec 1
      0.8 img0 [21,21,30,30]  IoU .81 with difficult   ignored (neither TP nor FP)
      0.7 img1 [0,0,5,5]      no overlap               FP   tp=1 fp=1  rec 1/3 prec 1/2
      0.6 img1 [50,50,60,60]  IoU 1 with B             TP   tp=2 fp=1  rec 2/3 prec 2/3
      0.5 img0 [1,0,10,10]    IoU .9 with A, taken     FP   tp=2 fp=2  rec 2/3 prec 1/2
    all-points AP: recall 0->1/3 at envelope precision 1, 1/3->2/3 at 2/3, then nothing: 1/3 + 2/9 = 5/9.
    11-point AP: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t >= .7 -> 0: (4 + 2) / 11 = 6/11.
    dog: 0.9 img0 exact TP, then 0.3 img1 (no dog there) FP after full recall: AP 1.
    bird: a detection but no ground truth: AP undefined (NaN), left out of the mean.
    """
    gt = {
        0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]]), np.array([0, 0, 1]), np.array([0, 1, 0])),
        1: (np.array([[50, 50, 60, 60], [70, 70, 80, 80]]), np.array([0, 0]), np.array([0, 0])),
    }
    preds = [
        {
            "boxes": torch.tensor([[0, 0, 10, 10], [21, 21, 30, 30], [1, 0, 10, 10], [0, 0, 10, 10], [5, 5, 9, 9]]),
            "scores": torch.tensor([0.9, 0.8, 0.5, 0.9, 0.2]),
            "labels": torch.tensor([0, 0, 0, 1, 2]),
        },
        {
            "boxes": torch.tensor([[0, 0, 5, 5], [50, 50, 60, 60], [50, 50, 60, 60]]),
            "scores": torch.tensor([0.7, 0.6, 0.3]),
            "labels": torch.tensor([0, 0, 1]),
        },
    ]
    return gt, [{"image_id": 0}, {"image_id": 1}], preds


@pytest.mark.parametrize(("use_07", "cat_ap"), [(False, 5 / 9), (True, 6 / 11)])
def test_voc_hand_computed(use_07, cat_ap):
    gt, targets, preds = hand_case()
    ev = VOCEvaluator(gt, CLASSES, use_07_metric=use_07)
    assert ev.primary == "mAP50"
    ev.update(targets, preds)
    out = ev.compute()
    assert out["AP50/cat"] == pytest.approx(cat_ap, abs=1e-12)
    assert out["AP50/dog"] == pytest.approx(1.0)
    assert np.isnan(out["AP50/bird"])
    assert out["mAP50"] == pytest.approx((cat_ap + 1.0) / 2, abs=1e-12)


def test_voc_iou_range_averages_the_ap_over_coco_thresholds():
    """cat: one box at IoU 0.8 (a TP up to threshold 0.80, a FP from 0.85: AP 1 at 7 of the 10 thresholds);
    dog: an exact box (AP 1 at all 10). mAP = mean over thresholds of the class mean = (7 * 1 + 3 * 0.5) / 10."""
    gt = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0, 1]), np.array([0, 0]))}
    prediction = {"boxes": [[0, 0, 10, 8], [20, 20, 30, 30]], "scores": [0.9, 0.8], "labels": [0, 1]}
    ev = VOCEvaluator(gt, ["cat", "dog"], iou_range=True)
    ev.update([{"image_id": 0}], [prediction])
    out = ev.compute()
    assert out["mAP50"] == pytest.approx(1.0) and out["mAP"] == pytest.approx(0.85, abs=1e-12)
    assert "mAP" not in VOCEvaluator(gt, ["cat", "dog"]).compute()  # off by default (VOC's own protocol)


def test_voc_state_merge_and_repeats():
    gt, targets, preds = hand_case()
    a, b = VOCEvaluator(gt, CLASSES), VOCEvaluator(gt, CLASSES)
    a.update(targets[:1], preds[:1])
    b.update(targets[1:], preds[1:])
    b.update(targets[:1], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
    a.merge(b.state())  # image 0 is already in `a`; b's empty copy of it must not replace it
    assert a.compute()["AP50/cat"] == pytest.approx(5 / 9)


def test_voc_iou_threshold_is_inclusive_and_difficult_only_image():
    gt = {0: (np.array([[0, 0, 10, 10]]), np.array([0]), np.array([0]))}
    ev = VOCEvaluator(gt, ["cat"])
    ev.update([{"image_id": 0}], [{"boxes": [[0, 0, 10, 5]], "scores": [1.0], "labels": [0]}])  # IoU exactly 0.5
    assert ev.compute()["mAP50"] == pytest.approx(1.0)
    ev = VOCEvaluator({0: (np.array([[0, 0, 10, 10]]), np.array([0]), np.array([1]))}, ["cat"])
    ev.update([{"image_id": 0}], [{"boxes": [[0, 0, 10, 10]], "scores": [1.0], "labels": [0]}])
    assert ev.compute()["mAP50"] == 0.0  # only difficult ground truth: nothing to score


def test_voc_box_convention_equals_devkit_plus_one():
    """Devkit IoU on raw 1-based inclusive boxes (w = x2 - x1 + 1) == our IoU on (x1-1, y1-1, x2, y2)."""
    rng = np.random.default_rng(0)
    xs, ys = np.sort(rng.integers(1, 60, size=(200, 2)), axis=1), np.sort(rng.integers(1, 60, size=(200, 2)), axis=1)
    raw = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # xmin, ymin, xmax, ymax as in the xml
    a, b = raw[:100].astype(float), raw[100:].astype(float)
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    devkit = inter / (area(a) + area(b) - inter)
    shift = np.array([1, 1, 0, 0])
    ours = np.diag(box_iou(a - shift, b - shift))
    np.testing.assert_allclose(ours, devkit, atol=1e-12)


def test_average_precision_reference_points():
    # one TP at full recall -> 1; precision 1/2 everywhere -> 1/2 for both metrics
    assert average_precision(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert average_precision(np.array([0.0, 1.0]), np.array([0.0, 0.5])) == pytest.approx(0.5)
    assert average_precision(np.array([0.0, 1.0]), np.array([0.0, 0.5]), use_07_metric=True) == pytest.approx(0.5)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def test_voc_perfect_detections_on_real_sample(shared_data):
    ds = VOCDetection(shared_data / "voc_samples" / "VOC2012", image_set="val", train=False)
    ev = ds.evaluator()
    targets, preds = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        h, w = target["orig_size"].tolist()
        boxes = target["boxes"] * torch.tensor([w, h, w, h])  # back to original pixels, as a head would
        targets.append(target)
        preds.append({"boxes": boxes, "scores": torch.linspace(1, 0.5, len(boxes)), "labels": target["labels"]})
    ev.update(targets, preds)
    out = ev.compute()
    assert out["mAP50"] == pytest.approx(1.0)
    assert {k for k, v in out.items() if not np.isnan(v)} == {"mAP50", "AP50/person", "AP50/bus", "AP50/car"}
