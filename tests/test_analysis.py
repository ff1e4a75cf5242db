"""The evaluation report's numbers against independent computations (COCOeval restricted to one category,
hand-made cases), its pictures and HTML, the dataset browser, and the training run's report and TensorBoard
images."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image
from pycocotools.cocoeval import COCOeval
from test_detection_metrics import coco_ds, detections_file, feed  # noqa: F401 (fixtures)

from tasks.analysis.evaluation_report import write_evaluation_report
from tasks.analysis.visualize import denormalise, image_grid
from tasks.analysis.worst_images import WorstImages, image_miou
from tasks.detection.confusion import match_image
from tasks.detection.voc_eval import VOCEvaluator, interpolated_precision
from tasks.segmentation.metrics import ConfusionMatrix


# -- detection numbers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_evaluator(coco_ds, detections_file):  # noqa: F811
    evaluator = coco_ds.evaluator()
    feed(evaluator, coco_ds, json.loads(detections_file.read_text()), coco_ds.image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.compute()
    return evaluator


def test_coco_per_class_ap_matches_cocoeval_run_on_that_category_alone(coco_evaluator, coco_ds, detections_file):  # noqa: F811
    per_class = coco_evaluator.per_class_ap()
    assert list(per_class) == coco_ds.class_names
    coco_dt = None
    checked = 0
    for name, cat_id in zip(coco_ds.class_names, coco_ds.label_to_cat_id):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_dt or coco_ds.coco.loadRes(str(detections_file))
            alone = COCOeval(coco_ds.coco, coco_dt, "bbox")
            alone.params.catIds = [cat_id]
            alone.params.imgIds = coco_ds.image_ids
            alone.evaluate()
            alone.accumulate()
            alone.summarize()
        expected = alone.stats[:3]  # AP, AP50, AP75; -1 where the category has no ground truth
        ours = [per_class[name][k] for k in ("AP", "AP50", "AP75")]
        if expected[0] == -1:
            assert all(np.isnan(ours)), name
            continue
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12, err_msg=name)
        checked += 1
    assert checked >= 60  # coco128 holds most of the 80 categories


def test_coco_pr_curve_averages_to_the_category_ap50(coco_evaluator):
    recall, curves = coco_evaluator.precision_recall()
    per_class = coco_evaluator.per_class_ap()
    assert len(recall) == 101
    for name, curve in curves.items():
        if np.isnan(per_class[name]["AP50"]):
            assert np.all(np.isnan(curve))
        else:  # COCO's AP50 is the mean of the interpolated precision at its 101 recall points
            mean = np.nanmean(np.where(np.isnan(curve), 0.0, curve))
            assert mean == pytest.approx(per_class[name]["AP50"], abs=1e-12)
            assert np.all(np.diff(curve[~np.isnan(curve)]) <= 1e-12)  # the envelope never rises


def test_voc_per_class_ap_and_curves_agree_with_compute():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    truth, dets = {}, {}
    for i in range(12):
        corner = rng.uniform(0, 80, (4, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(15, 25, (4, 2))], axis=1)
        labels = rng.integers(0, 2, 4)  # class "c" never appears: NaN
        truth[i] = (boxes, labels, rng.random(4) < 0.1)
        keep = rng.random(4) < 0.8
        dets[i] = {"boxes": torch.tensor(boxes[keep] + rng.normal(0, 2, (int(keep.sum()), 4))),
                   "scores": torch.tensor(rng.random(int(keep.sum()))),
                   "labels": torch.tensor(np.where(rng.random(int(keep.sum())) < 0.85, labels[keep], 2))}
    evaluator = VOCEvaluator(truth, names)
    evaluator.update([{"image_id": i} for i in dets], list(dets.values()))
    metrics = evaluator.compute()
    per_class = evaluator.per_class_ap()
    for name in names:
        assert per_class[name]["AP50"] == pytest.approx(metrics[f"AP50/{name}"], nan_ok=True)
    grid, curves = evaluator.precision_recall()
    assert np.all(np.isnan(curves["c"]))
    assert np.all(curves["a"][:-1] >= curves["a"][1:])


def test_interpolated_precision_is_the_envelope_at_each_recall():
    recall = np.array([0.25, 0.5, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 0.67, 0.6])
    grid = np.array([0.0, 0.25, 0.3, 0.5, 0.6, 0.75, 0.8, 1.0])
    # best precision at recall >= r: 1.0 up to 0.25, 0.67 up to 0.5, 0.6 up to 0.75, nothing beyond
    np.testing.assert_allclose(interpolated_precision(recall, precision, grid), [1.0, 1.0, 0.67, 0.67, 0.6, 0.6, 0, 0])


def test_confusion_matching_on_a_hand_made_image():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70], [80, 80, 90, 90]], float)
    gt_labels = np.array([0, 1, 0, 1, 1])
    ignore = np.array([False, False, False, True, False])
    dets = np.array([
        [0, 0, 10, 10],      # class 0 on a class-0 box: right
        [20, 20, 30, 30],    # class 0 on a class-1 box: confused
        [100, 100, 110, 110],  # class 1 on nothing: false detection
        [60, 60, 70, 70],    # class 0 on an ignored (crowd) box: not counted
        [40, 40, 50, 50],    # class 1, score below the threshold: not counted (the class-0 box is missed)
        [80, 80, 91, 90],    # class 1: IoU 0.91 with the class-1 box, 0 elsewhere: right
    ], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.5])
    labels = np.array([0, 0, 1, 0, 1, 1])
    result = match_image(gt, gt_labels, ignore, dets, scores, labels, num_classes=2)
    assert sorted(result.pairs) == sorted([(0, 0), (1, 0), (2, 1), (1, 1), (0, 2)])
    assert (result.missed, result.false_detections, result.confused, result.errors) == (1, 1, 1, 3)
    # same class first: a class-1 detection over a class-0 box (IoU 0.82) and a class-1 box (IoU 0.67)
    # takes the class-1 box; the class-0 box is then missed
    two = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], float)
    result = match_image(two, np.array([0, 1]), np.zeros(2, bool), np.array([[0.5, 0, 10.5, 10]]), np.array([0.9]),
                         np.array([1]), num_classes=2)
    assert sorted(result.pairs) == [(0, 2), (1, 1)]


# -- segmentation worst images ---------------------------------------------------------------------------
def test_image_miou_by_hand():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    prediction = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    # class 0: 3 right of 4 truth, 3 predicted -> 3/4; class 1: 3 right, 3 truth, 4 predicted -> 3/4
    assert image_miou(truth, prediction) == pytest.approx(0.75)
    assert np.isnan(image_miou(np.full((2, 2), 255), np.zeros((2, 2))))


def test_worst_images_keeps_the_lowest_and_leaves_the_metric_alone():
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, (8, 8)) for _ in range(6)]
    noise = [0.0, 0.6, 0.1, 0.9, 0.3, 0.5]  # share of pixels made wrong
    preds = []
    for mask, share in zip(masks, noise):
        pred = mask.copy()
        wrong = rng.random(mask.shape) < share
        pred[wrong] = (pred[wrong] + 1) % 3
        preds.append(pred)
    targets = [{"mask": torch.from_numpy(m), "image_id": f"im{i}"} for i, m in enumerate(masks)]
    predictions = [{"mask": torch.from_numpy(p)} for p in preds]
    plain = ConfusionMatrix(3, class_names=["bg", "x", "y"])
    plain.update(targets, predictions)
    halves = [WorstImages(ConfusionMatrix(3, class_names=["bg", "x", "y"]), keep=3) for _ in range(2)]
    halves[0].update(targets[:3], predictions[:3])
    halves[1].update(targets[3:], predictions[3:])
    halves[0].merge([halves[1].state()])
    assert halves[0].compute() == plain.compute()
    scores = [image_miou(m, p) for m, p in zip(masks, preds)]
    expected = [f"im{i}" for i in np.argsort(scores)[:3]]
    assert [w[0] for w in halves[0].worst()] == expected
    assert halves[0].primary == "mIoU" and halves[0].class_names == ["bg", "x", "y"]


# -- pictures and the report -----------------------------------------------------------------------------
def test_denormalise_undoes_the_normalisation():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    tensor = torch.from_numpy(((image / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(denormalise(tensor, mean, std), image)


def test_image_grid_lays_tiles_in_rows():
    tiles = [np.full((10, 20, 3), 40 * i, np.uint8) for i in range(5)]
    grid = image_grid(tiles, [f"t{i}" for i in range(5)], columns=2, tile_width=40, gap=4)
    assert grid.size == (2 * 40 + 3 * 4, 3 * (20 + 14) + 4 * 4)  # 3 rows of a caption strip and a 40x20 tile
    assert np.asarray(grid)[4 + 14 + 5, 4 + 40 + 4 + 5].tolist() == [40, 40, 40]  # tile 1: row 0, column 1


@pytest.fixture(scope="module")
def detection_report(coco_evaluator, coco_ds, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("detection_report")
    (out / "config.yaml").write_text("dataset: coco128\n")
    metrics = {"AP": 0.5, "AP50": 0.7}
    return write_evaluation_report(coco_evaluator, coco_ds, metrics, out, title="coco128 check",
                                   checkpoint=out / "model.ckpt", config=out / "config.yaml")


def test_detection_report_writes_the_pictures_and_an_html_page_embedding_them(detection_report):
    assert set(detection_report.figures) == {"per_class_ap", "pr_curves", "confusion_matrix", "worst_images"}
    page = detection_report.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 4
    for data, path in zip(embedded, detection_report.figures.values()):
        assert base64.b64decode(data) == path.read_bytes()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing from a network
    assert 'href="config.yaml"' in page and 'href="model.ckpt"' in page
    assert all(f"<td>{name}</td>" in page for name in ("person", "dog"))
    worst = Image.open(detection_report.figures["worst_images"])
    assert worst.width == 2 * 480 + 3 * 4  # 2 columns of ground truth | predictions pairs
    assert len(np.unique(np.asarray(worst).reshape(-1, 3), axis=0)) > 1000  # real photos, not blank tiles


def test_segmentation_report_tables_the_evaluator_numbers(shared_data, tmp_path):
    from tasks.segmentation.transforms import build_segmentation_transforms
    from tasks.segmentation.voc import VOCSegmentation

    dataset = VOCSegmentation(shared_data / "voc_samples" / "VOC2012", "val",
                              build_segmentation_transforms(160, train=False))
    evaluator = WorstImages(dataset.evaluator(), keep=4)
    rng = np.random.default_rng(0)
    for index in range(6):
        _, target = dataset[index]
        mask = target["mask"].clone()
        mask[torch.from_numpy(rng.random(mask.shape) < 0.1 * index) & (mask != 255)] = 0  # objects eroded
        evaluator.update([target], [{"mask": mask}])
    metrics = evaluator.compute()
    report = write_evaluation_report(evaluator, dataset, metrics, tmp_path, title="voc check")
    assert set(report.figures) == {"confusion_matrix", "per_class_iou", "worst_images"}
    page = report.html.read_text()
    rows = dict(re.findall(r"<tr[^>]*><td>([a-z]+)</td><td>([0-9.n/a]+)</td>", page))
    for name in dataset.class_names:
        value = metrics[f"IoU/{name}"]
        assert rows[name] == ("n/a" if np.isnan(value) else f"{value:.4f}")
    assert "config: <em>not available</em>" in page
    # 4 worst images of 3 panels each: image | truth | prediction, 480 px per entry
    assert Image.open(report.figures["worst_images"]).width == 2 * 480 + 3 * 4


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine (`make browser` installs "
                                             "Debian's chromium package)")
def test_report_renders_in_headless_chromium(detection_report, tmp_path):
    url = detection_report.html.resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "report.png"
    run = subprocess.run([CHROMIUM, *flags, "--window-size=1280,1600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "ERR_" in line or "Uncaught" in line]
    assert not console, console
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape == (1600, 1280, 3)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # text, tables and figures, not a blank page
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    table = re.search(r'<table id="table0">(.*?)</table>', dom, re.S)
    assert table and "<th>AP50</th>" in table.group(1) and "<td>person</td>" in table.group(1)
    assert dom.count("<img ") == 4


# -- browse and the training run -------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,augment", [("shapes_det", True), ("shapes_seg", False)])
def test_browse_writes_the_grid_and_the_label_statistics(dataset, augment, tmp_path):
    from hydra import compose, initialize_config_module

    from tasks.browse import browse_dataset

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("browse", overrides=[
            f"dataset={dataset}", f"dataset.root={tmp_path / dataset}", "dataset.prepare.num_train=6",
            "dataset.prepare.num_val=2", "dataset.prepare.image_size=64", "dataset.input_size=64", "n=4",
            "tile_width=100", f"augment={augment}"])
    written = browse_dataset(cfg, tmp_path / "browse")
    assert written["samples"].name == ("samples_train_augmented.png" if augment else "samples_train.png")
    assert Image.open(written["samples"]).size == (2 * 100 + 3 * 4, 2 * (100 + 14) + 3 * 4)
    assert Image.open(written["labels"]).width > 1000


@pytest.mark.parametrize("dataset", ["shapes_det", "shapes_seg"])
def test_browse_shows_device_augmentation_as_the_cpu_path_would(dataset, tmp_path):
    """augment=true on a dataset trained with device_augment=true: the workers' planned images are painted as the
    engine paints them, so the grid is the CPU augmentation's (segmentation bit for bit; detection's device path
    is within 1 uint8 level of the CPU's)."""
    from hydra import compose, initialize_config_module

    from tasks.browse import browse_dataset

    grids = []
    for device in (False, True):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose("browse", overrides=[
                f"dataset={dataset}", f"dataset.root={tmp_path / dataset}", "dataset.prepare.num_train=6",
                "dataset.prepare.num_val=2", "dataset.prepare.image_size=64", "dataset.input_size=64", "n=4",
                "tile_width=100", "augment=true", f"+dataset.train.transforms.device_augment={device}"])
        grids.append(np.asarray(Image.open(browse_dataset(cfg, tmp_path / f"browse_{device}")["samples"]), np.int16))
    difference = np.abs(grids[0] - grids[1])
    if dataset == "shapes_seg":
        assert difference.max() == 0
    else:
        assert difference.mean() < 0.05, difference.mean()


@pytest.mark.slow
def test_browse_cli_runs_and_refuses_an_unknown_split(tmp_path):
    command = [sys.executable, "-m", "tasks.browse", f"dataset.root={tmp_path / 'shapes'}",
               "dataset.prepare.num_train=4", "dataset.prepare.num_val=2", "dataset.prepare.image_size=64", "n=2",
               f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"]  # nothing left in the repo
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(tmp_path / "out" / "samples_train.png") in run.stdout
    bad = subprocess.run([*command, "split=test"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "expected train or val" in bad.stderr


def test_default_box_sizes_follow_the_head_config():
    from tasks.analysis.browse import default_box_sizes

    head = {"in_features": ["C4", "C5"], "extra_depths": [8], "min_scale": 0.2, "max_scale": 0.9,
            "aspect_ratios": [2.0], "reduced_first_map": False, "clip_anchors": True}
    sizes = {(round(float(w), 4), round(float(h), 4)) for w, h in default_box_sizes(head)}
    # SSD: s_k = 0.2, 0.55, 0.9 (+ 1.0); per map (s, s), (sqrt(s s'), same), (s sqrt2, s / sqrt2) and its transpose
    expected = set()
    for s, s_next in ((0.2, 0.55), (0.55, 0.9), (0.9, 1.0)):
        r = np.sqrt(2.0)
        for w, h in ((s, s), (np.sqrt(s * s_next),) * 2, (s * r, s / r), (s / r, s * r)):
            expected.add((round(float(min(w, 1.0)), 4), round(float(min(h, 1.0)), 4)))
    assert sizes == expected
    assert default_box_sizes({"_target_": "heads.deeplabv3.DeepLabV3Head"}) is None


def test_training_writes_a_report_per_evaluation_and_sends_its_pictures_to_tensorboard(artifacts):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for task, names in (("detection", {"per_class_ap", "pr_curves", "confusion_matrix", "worst_images"}),
                        ("segmentation", {"per_class_iou", "confusion_matrix", "worst_images"})):
        run_dir = Path(artifacts[task]["checkpoint"]).parent
        report = run_dir / "reports" / "epoch_001"
        assert {p.stem for p in report.glob("*.png")} == names
        assert 'href="../../last.ckpt"' in (report / "report.html").read_text()
        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        assert set(events.Tags()["images"]) == {f"report/{n}" for n in names}


def test_demo_ends_by_printing_where_its_reports_are(monkeypatch, tmp_path, capsys):
    import tasks.demo as demo

    def fake_run(experiment, run_dir, overrides=()):  # what train() leaves: one report per evaluation
        for epoch in (1, 2):
            (run_dir / "reports" / f"epoch_{epoch:03d}").mkdir(parents=True)
            (run_dir / "reports" / f"epoch_{epoch:03d}" / "report.html").write_text("<html></html>")
        return {"AP": 0.6, "mIoU": 0.8}, 0.1

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "run_demo", fake_run)
    monkeypatch.setattr(demo, "write_overlays", lambda run_dir: [run_dir / "overlays" / "a.png"])
    assert demo.main([]) == 0
    tail = capsys.readouterr().out.strip().splitlines()[-3:]
    assert tail[0].startswith("== evaluation reports")
    for line, task in zip(tail[1:], ("detection", "segmentation")):
        assert line.split()[0] == task and line.endswith(f"{task}/reports/epoch_002/report.html")
        assert (tmp_path / line.split()[1]).is_file()


def test_voc_detection_report_reads_the_images_behind_its_integer_ids(shared_data, tmp_path):
    from tasks.detection.voc import VOCDetection

    dataset = VOCDetection(shared_data / "voc_samples" / "VOC2012", "val")
    evaluator = dataset.evaluator()
    rng = np.random.default_rng(0)
    for index, record in enumerate(dataset.records):
        keep = rng.random(len(record.boxes)) < 0.7  # some objects missed, the rest found with jitter
        boxes = record.boxes[keep] + rng.normal(0, 3, (int(keep.sum()), 4))
        evaluator.update([{"image_id": index}], [{"boxes": torch.tensor(boxes), "labels": torch.tensor(
            record.labels[keep]), "scores": torch.tensor(rng.uniform(0.4, 1.0, int(keep.sum())))}])
    metrics = evaluator.compute()
    report = write_evaluation_report(evaluator, dataset, metrics, tmp_path, title="voc detection check")
    page = report.html.read_text()
    assert "<th>AP50</th>" in page and "<th>AP75</th>" not in page
    for name in dataset.class_names:
        value = metrics[f"AP50/{name}"]
        assert re.search(rf"<td>{name}</td><td>{'n/a' if np.isnan(value) else f'{value:.4f}'}</td>", page), name
    worst = np.asarray(Image.open(report.figures["worst_images"]))
    assert len(np.unique(worst.reshape(-1, 3), axis=0)) > 1000  # the VOC photos were found and drawn
