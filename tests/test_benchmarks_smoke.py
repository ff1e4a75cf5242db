"""benchmarks/: the timing helper against hand-computed values and numpy, and the whole run at tiny sizes.

No timed assertions: the smoke run only checks that every code path runs and what the results hold.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package; `python -m pytest` finds it anyway
    sys.path.insert(0, str(ROOT))

from benchmarks import dataloading, deploy, detection, postprocess, run, segmentation  # noqa: E402
from benchmarks.timing import interleaved, paired_ratio, summarise  # noqa: E402

TINY = run.Plan(
    detection.DetectionSettings(input_size=64, num_classes=3, train_batch=2, infer_batch=1, train_repeats=1,
                                train_warmup=1, infer_repeats=1, warmup=0),
    segmentation.SegmentationSettings(input_size=65, num_classes=4, repeats=1, warmup=0),
    deploy.DeploySettings(detection_size=64, detection_classes=3, segmentation_size=65,
                          segmentation_classes=4, width_mult=0.25, repeats=1, warmup=0, peak_size=64,
                          peak_repeats=1, peak_warmup=0, calibration_images=1),
    dataloading.DataSettings(sizes=(64,), workers=(0, 1), num_images=8, batch=2, train_repeats=1,
                             train_warmup=1, pipeline_steps=2, width_mult=0.25, per_core_rounds=1,
                             detection_size=64, segmentation_size=65, per_core_images=4),
    postprocess.PostprocessSettings(input_size=64, num_classes=3, width_mult=0.25, repeats=1, warmup=0,
                                    dynamo=False, objects=2, anchors_per_object=4),
)


def test_summarise_matches_numpy_percentiles():
    samples = [9.0, 1.0, 4.0, 7.5, 3.0, 12.0, 5.5]
    q1, median, q3 = np.percentile(samples, [25, 50, 75])  # numpy's default is the inclusive method
    s = summarise(samples)
    assert (s.q1, s.median, s.q3, s.n) == pytest.approx((q1, median, q3, 7))
    assert s.as_dict()["iqr"] == pytest.approx(q3 - q1)
    assert s.min == 1.0
    assert summarise([2.5]).as_dict() == {"median": 2.5, "q1": 2.5, "q3": 2.5, "n": 1, "min": 2.5, "iqr": 0.0}
    with pytest.raises(ValueError, match="no samples"):
        summarise([])


def test_interleaved_rotates_the_order_and_drops_warmup():
    calls, now = [], [0.0]

    def clock():
        return now[0]

    def contender(name, seconds):
        def call():
            calls.append(name)
            now[0] += seconds
        return call

    samples = interleaved({"a": contender("a", 0.010), "b": contender("b", 0.030), "c": contender("c", 0.002)},
                          repeats=3, warmup=1, clock=clock)
    # Round r starts at contender r mod 3: every contender takes every position once per 3 rounds.
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert samples["a"] == pytest.approx([10.0] * 3)
    assert samples["b"] == pytest.approx([30.0] * 3)
    assert samples["c"] == pytest.approx([2.0] * 3)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ours, peer = [10.0, 30.0, 12.0], [20.0, 40.0, 10.0]  # ratios 0.5, 0.75, 1.2
    r = paired_ratio(ours, peer)
    assert r.median == pytest.approx(0.75)
    assert (r.q1, r.q3) == pytest.approx((0.625, 0.975))
    with pytest.raises(ValueError, match="as many samples"):
        paired_ratio([1.0], [1.0, 2.0])


def test_cli_runs_every_benchmark_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "QUICK", TINY)
    threads = torch.get_num_threads()
    out = tmp_path / "bench" / "results.json"
    try:
        returned = run.main(["--quick", "--threads", "1", "--out", str(out), "--only", "detection",
                             "--only", "segmentation"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert results["rows"] == json.loads(json.dumps(returned["rows"]))

    env = results["environment"]
    assert env["threads"] == 1 and env["quick"] is True
    assert env["torch"] == torch.__version__ and env["torchvision"] == torchvision.__version__
    assert env["cpu_model"] and env["date"] and "--quick" in env["command"]

    rows = results["rows"]
    assert [(r["task"], r["role"]) for r in rows] == [("detection", "ours"), ("detection", "peer")] * 6 + [
        ("segmentation", "ours"), ("segmentation", "peer")] * 2
    for row in rows:
        assert len(row["samples_ms"]) == 1 and row["time_ms"]["median"] == row["samples_ms"][0] > 0
        assert row["params"] > 0 and row["madds"] > 0
        assert (row["ratio"] is None) == (row["role"] == "peer")
        assert row["model"] in printed
    for ours, peer in zip(rows[::2], rows[1::2]):
        assert ours["ratio"]["median"] > 0
        assert ours["ratio"]["median"] == pytest.approx(ours["samples_ms"][0] / peer["samples_ms"][0])
    assert len(results["comparisons"]) == 8
    # Training: NCHW and channels_last like for like with the C library's malloc, channels_last like for like
    # with freed memory reused, each side's default (ours channels_last + reuse, torchvision NCHW + system), and
    # ours with reuse against ours without, from six contenders of the same rounds in two child processes.
    d = detection
    train = [r for r in rows if r["measure"].startswith("train step")]
    assert [r["model"] for r in train] == [
        d.OURS + d.NCHW_SYSTEM, d.PEER + d.NCHW_SYSTEM, d.OURS + d.CL_SYSTEM, d.PEER + d.CL_SYSTEM,
        d.OURS + d.CL_REUSE, d.PEER + d.CL_REUSE, d.OURS_DEFAULT, d.PEER_DEFAULT, d.OURS + d.CL_REUSE,
        d.OURS + d.CL_SYSTEM]
    assert [c["measure"] for c in results["comparisons"][:5]] == [r["measure"] for r in train[::2]]
    assert train[6]["samples_ms"] == train[4]["samples_ms"] and train[7]["samples_ms"] == train[1]["samples_ms"]
    processes = results["checks"]["detection"]["train_processes"]
    assert set(processes) == {"system", "reuse"} and processes["system"]["pid"] != processes["reuse"]["pid"]
    assert processes["system"]["memory_reuse_applied"] is False and processes["reuse"]["cpu_memory"] == "reuse"
    assert all(p["threads"] == 1 for p in processes.values())
    for row in train:  # where each contender ran, and its page faults per timed step
        child = "reuse" if row["model"] in (d.OURS + d.CL_REUSE, d.PEER + d.CL_REUSE, d.OURS_DEFAULT) else "system"
        assert (row["process"], row["cpu_memory"], row["pid"]) == (child, child, processes[child]["pid"])
        assert row["layout"] == ("NCHW" if d.NCHW_SYSTEM in row["model"] else "channels_last")
        assert len(row["minor_faults_samples"]) == 1 and len(row["minor_faults_warmup"]) == 1
        assert row["minor_faults_per_step"]["median"] == row["minor_faults_samples"][0] >= 0
    assert all(r["process"] == "main" for r in rows[10:12])  # inference: in this process

    # Detection: the peer is the same network (parameters, MAdds, outputs, losses), checked before timing.
    det = results["checks"]["detection"]
    assert det["params_ours"] == det["params_peer"] == rows[0]["params"] == rows[1]["params"]
    assert det["madds_ours"] == det["madds_peer"]
    assert det["max_abs_diff_cls_logits"] < 1e-4 and det["max_abs_diff_bbox_regression"] < 1e-4
    assert det["detections_per_image_ours"] == det["detections_per_image_peer"]
    assert det["ours_loss_box"] == pytest.approx(det["peer_loss_box"], rel=1e-4)
    assert det["ours_loss_cls"] == pytest.approx(det["peer_loss_cls"], rel=1e-4)

    # Segmentation: torchvision's parameter counts, straight from torchvision.
    peers = {segmentation.PEER_LIGHT: torchvision.models.segmentation.lraspp_mobilenet_v3_large,
             segmentation.PEER_ASPP: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large}
    for row in rows[12:]:
        if row["role"] == "peer":
            model = peers[row["model"]](weights=None, weights_backbone=None, num_classes=4)
            assert row["params"] == sum(p.numel() for p in model.parameters())
    assert all(shape == [1, 65, 65] for shape in results["checks"]["segmentation"]["mask_shapes"].values())


def test_cli_runs_the_deploy_and_data_sections_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "QUICK", TINY)
    threads = torch.get_num_threads()
    out = tmp_path / "bench" / "deploy.json"
    try:
        run.main(["--quick", "--threads", "1", "--out", str(out), "--only", "deploy", "--only", "data"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert results["rows"] == [] and set(results["plan"]) == {"deploy", "data"}

    # Deploy: every path of both models, its MAdds/s and % of peak from its own time and the measured peak.
    section = results["deploy"]
    peak = section["peak"]
    assert peak["size"] == 64 and peak["threads"] == 1
    assert peak["madds_per_s"] == pytest.approx(64 ** 3 / (peak["time_ms"]["median"] / 1e3))
    assert peak["madds_per_s"] == max(peak["madds_per_s_before"], peak["madds_per_s_after"])
    paths = [(r["task"], r["path"]) for r in section["rows"]]
    assert paths == [("detection", p) for p in (*deploy.PATHS, deploy.ORT_POST)] + [
        ("segmentation", p) for p in deploy.PATHS]
    for row in section["rows"]:
        seconds = row["time_ms"]["median"] / 1e3
        assert row["madds"] > 0 and row["madds_per_s"] == pytest.approx(row["madds"] / seconds)
        assert row["percent_of_peak"] == pytest.approx(100 * row["madds_per_s"] / peak["madds_per_s"])
        eager = next(r for r in section["rows"] if r["task"] == row["task"] and r["path"] == deploy.EAGER)
        assert row["vs_eager"]["median"] == pytest.approx(row["samples_ms"][0] / eager["samples_ms"][0])
        assert row["path"] in printed
    for task in ("detection", "segmentation"):
        checks = results["checks"]["deploy"][task]
        assert checks["batchnorms_folded"] > 0
        assert max(checks["folded_rel_diff"].values()) < 1e-3
        assert max(checks["ort_fp32_rel_diff"].values()) < 1e-3
        assert checks["int8_onnx_mb"] < checks["onnx_mb"]  # int8 weights: about a quarter of the fp32 bytes
    # Untrained, every class scores ~1/(K+1) > 0.01: all anchors of all 3 classes reach NMS. SSDLite at 64 px:
    # maps of 4x4 (3 boxes each, TF's reduced first map), 2x2, 1x1, 1x1, 1x1, 1x1 (6 boxes each) = 96 anchors.
    anchors = 4 * 4 * 3 + (2 * 2 + 1 + 1 + 1 + 1) * 6
    assert results["checks"]["deploy"]["detection"]["nms_candidates_per_image"] == 3 * anchors

    # Data: 8 images in batches of 2 = 4 batches, the first one untimed; the verdict follows the two rates.
    data = results["data"]
    loaders = [(r["input_size"], r["num_workers"], r["images"]) for r in data["loader"]]
    assert loaders == [(64, 0, 6), (64, 1, 6)]
    assert [r["images"] for r in data["pipeline"]] == [4, 4]
    (step,) = data["train_step"]
    assert step["images_per_s"] == pytest.approx(2 / (step["time_ms"]["median"] / 1e3))
    for v in data["verdicts"]:
        slower = "data loading" if v["loader_images_per_s"] < v["step_images_per_s"] else "training step"
        assert v["bottleneck"] == slower and v["bottleneck"] in printed
    # Per core: detection in three modes and device augmentation's two sides, segmentation in two modes and
    # device augmentation's two sides, each figure from its own median batch time.
    modes = [r["mode"] for r in data["per_core"]]
    assert modes == [dataloading.BEFORE, dataloading.OPENCV, dataloading.UINT8, dataloading.PLANNED,
                     dataloading.PAINTED, dataloading.BEFORE, dataloading.OPENCV, dataloading.PLANNED,
                     dataloading.PAINTED]
    for r in data["per_core"]:
        assert r["images_per_s_per_core"] == pytest.approx(2 / (r["time_ms"]["median"] / 1e3))
        assert r["cores_for_gpu_rate"] == pytest.approx(2000 / r["images_per_s_per_core"])
        assert r["mode"] in printed and r["pipeline"] in printed
    assert "--only deploy --only data" in results["environment"]["command"]


def test_cli_runs_the_postprocess_section_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "QUICK", TINY)
    threads = torch.get_num_threads()
    out = tmp_path / "bench" / "post.json"
    try:
        run.main(["--quick", "--threads", "1", "--out", str(out), "--only", "postprocess"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    section, checks = results["postprocess"], results["checks"]["postprocess"]
    paths = (postprocess.EAGER, postprocess.PEER, postprocess.ORT, postprocess.ORT_SPIN, postprocess.ORT_RAW)
    assert [(r["regime"], r["path"]) for r in section["rows"]] == [(g, p) for g in postprocess.REGIMES for p in paths]
    # Untrained: every class of all 96 anchors at 64 px (see the deploy test) passes; the realistic logits
    # leave only the planted objects (2 x 4 anchors) and a little background noise.
    assert checks["candidates"]["random weights"]["above_threshold"] == 3 * 96
    assert 8 <= checks["candidates"]["realistic scores"]["above_threshold"] < 3 * 96
    for same in checks["vs_torchvision_detections"].values():
        assert same["ours"] == same["torchvision"] > 0 and same["max_abs_diff_sorted_scores"] < 1e-5
    for row in section["rows"]:
        (network,), (post,) = row["samples_ms"]["network"], row["samples_ms"]["post"]
        assert row["post_over_network"]["median"] == pytest.approx(post / network)
        assert ("post_vs_torchvision" in row) == (row["path"] != postprocess.PEER)
        assert row["path"] in printed


def test_verdict_against_hand_computed_rates():
    # In-process loading and the step take turns: 1 / (1/100 + 1/10) images/s together.
    v = dataloading.verdict(100.0, 10.0, workers=0)
    assert v["bottleneck"] == "training step" and v["expected_images_per_s"] == pytest.approx(1000 / 110)
    assert "10%" in v["note"]
    v = dataloading.verdict(5.0, 10.0, workers=2)  # workers overlap: the slower side sets the pace
    assert v["bottleneck"] == "data loading" and v["expected_images_per_s"] == 5.0
    assert v["supply_over_demand"] == 0.5


def test_bad_thread_count_is_refused():
    with pytest.raises(SystemExit):
        run.parse_args(["--threads", "0"])


@pytest.mark.slow
def test_finetune_benchmark_trains_both_recipes_on_real_photos(shared_data, tmp_path):
    """benchmarks/finetune.py end to end, 1 epoch: structure only (the figures are the closing notes')."""
    from benchmarks import finetune

    out = tmp_path / "finetune.json"
    finetune.main(["--coco", str(shared_data / "coco128"), "--epochs", "1", "--threads", "2", "--workers", "0",
                   "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["data"]["train"] + result["data"]["val"] == 75  # coco128 photos holding a person, car or dog
    assert [r["contender"].split(" ")[0] for r in result["rows"]] == ["torchvision", "ours"]
    for row in result["rows"]:
        assert row["seconds"] > 0 and 0.0 <= row["AP50:95"] <= row["AP50"] <= 1.0
    assert result["ours_over_torchvision"]["time"] == pytest.approx(
        result["rows"][1]["seconds"] / result["rows"][0]["seconds"])
    # the reference as its train.py times it: its loop plus an evaluation after every epoch
    assert result["rows"][0]["seconds_as_run"] > result["rows"][0]["seconds"]
    assert result["ours_over_torchvision"]["time_vs_reference_as_run"] == pytest.approx(
        result["rows"][1]["seconds"] / result["rows"][0]["seconds_as_run"])
    # MobileNetV2 SSDLite costs more per image than MobileNetV3-Large's (paper: 0.8 B vs 0.51 B MAdds at 80 classes)
    macs = result["gmacs_per_image"]
    assert macs["ours"] > macs["torchvision"] > 0
    assert result["ours_over_torchvision"]["gmacs"] == pytest.approx(macs["ours"] / macs["torchvision"])


def _tiny_coco(root: Path, images: list[tuple[int, int]], annotations: list[dict], categories: list[str]) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    for index, (width, height) in enumerate(images, 1):
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "train2017" / f"{index:012d}.jpg")
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h}
                   for i, (w, h) in enumerate(images, 1)],
        "annotations": [{"id": i, "bbox": [0, 0, 1, 1], **a} for i, a in enumerate(annotations, 1)],
        "categories": [{"id": i, "name": n} for i, n in enumerate(categories, 1)]}))


def _square(x: int, y: int, size: int) -> list[list[int]]:
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def test_coco_seg_subset_paints_smaller_instances_last_and_crops_to_4x3(tmp_path):
    """Hand-built COCO json: a 640x480 photo (no crop) where a small 'cup' lies on a large 'table', a crowd
    'table' region and a 'sock' (the least-area category, left out: background); and a 480x640 portrait
    whose middle 480x360 band is kept."""
    from benchmarks.coco_seg_subset import crop_box, write_voc_segmentation

    assert crop_box(640, 480) == (0, 0, 640, 480) and crop_box(480, 640) == (0, 140, 480, 500)
    assert crop_box(640, 427) == (35, 0, 604, 427)  # 427 * 4 / 3 = 569.3 -> 569 wide; (640 - 569) // 2 = 35
    anns = [
        {"image_id": 1, "category_id": 1, "segmentation": _square(0, 0, 400), "area": 160000, "iscrowd": 0},
        {"image_id": 1, "category_id": 2, "segmentation": _square(100, 100, 100), "area": 10000, "iscrowd": 0},
        {"image_id": 1, "category_id": 1, "segmentation": _square(500, 300, 100), "area": 10000, "iscrowd": 1},
        {"image_id": 1, "category_id": 3, "segmentation": _square(440, 0, 40), "area": 1600, "iscrowd": 0},
        {"image_id": 2, "category_id": 2, "segmentation": _square(0, 0, 480), "area": 230400, "iscrowd": 0},
        {"image_id": 2, "category_id": 1, "segmentation": [[0, 400, 480, 400, 480, 640, 0, 640]], "area": 115200,
         "iscrowd": 0},
    ]
    _tiny_coco(tmp_path / "coco", [(640, 480), (480, 640)], anns, ["table", "cup", "sock"])
    out = tmp_path / "seg"
    written = write_voc_segmentation(tmp_path / "coco", out, num_objects=2, num_val=1, seed=0)
    # table: 160000 + 115200 px (the crowd region does not count), cup: 10000 + 230400, sock: 1600.
    assert written == {"class_names": ["background", "table", "cup"], "val": 1, "train": 1}
    assert (out / "labels.txt").read_text().split() == ["background", "table", "cup"]
    assert sorted((out / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split()[0]
                  for s in ("train", "val")) == ["000000000001", "000000000002"]
    first = np.array(Image.open(out / "SegmentationClass" / "000000000001.png"))
    assert first.shape == (360, 480) and Image.open(out / "JPEGImages" / "000000000001.jpg").size == (480, 360)
    # 640x480 -> 480x360 is x 0.75: table [0, 300), cup [75, 150), crowd [375, 450) x [225, 300), sock ignored.
    assert (first[:300, :300][first[:300, :300] != 2] == 1).all() and (first[80:145, 80:145] == 2).all()
    assert (first[230:295, 380:445] == 255).all()
    assert first[:30, 335:355].max() == 0 and first[310:, 310:].max() == 0
    assert set(np.unique(first)) == {0, 1, 2, 255}
    # Portrait: rows 140..500 kept; the cup (rows 0..480) is the larger instance, painted first; the table
    # (rows 400..640) drawn over it: crop rows 0..260 cup, 260..360 table.
    second = np.array(Image.open(out / "SegmentationClass" / "000000000002.png"))
    assert (second[:255] == 2).all() and (second[265:] == 1).all()


@pytest.mark.slow
def test_finetune_seg_benchmark_trains_both_recipes_on_real_photos(shared_data, tmp_path):
    """benchmarks/finetune_seg.py --quick end to end (structure only: the figures are the closing notes'), and
    the written masks against pycocotools' own rasterisation of one val photo."""
    from pycocotools.coco import COCO

    from benchmarks import finetune_seg
    from benchmarks.coco_seg_subset import write_voc_segmentation

    out = tmp_path / "finetune_seg.json"
    threads = torch.get_num_threads()
    try:
        finetune_seg.main(["--coco", str(shared_data / "coco128"), "--quick", "--threads", "1", "--workers", "0",
                           "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    data = result["data"]
    assert (data["train"], data["val"], data["trained_on"], len(data["class_names"])) == (100, 28, 16, 11)
    assert result["epochs"] == 1 and result["environment"]["quick"] is True
    assert [r["side"] for r in result["rows"]] == ["torchvision", "ours"]
    torchvision_row, ours = result["rows"]
    for row in result["rows"]:
        assert row["seconds"] > 0 and 0.0 <= row["mIoU"] <= 1.0 and 0.0 <= row["pixel_acc"] <= 1.0
        assert set(row["IoU"]) == set(data["class_names"])
        assert sum(row["time_split"].values()) == pytest.approx(row["seconds"], abs=1.0)
    assert set(ours["time_split"]) == {"startup", "train", "evaluate", "report", "finish"}
    assert ours["time_split"]["evaluate"] > 0  # the last epoch is always evaluated
    ratios = result["ours_over_torchvision"][torchvision_row["contender"]]
    assert ratios["time"] == pytest.approx(ours["seconds"] / torchvision_row["seconds"])
    assert torchvision_row["seconds_as_run"] > torchvision_row["seconds"]  # + its evaluation after every epoch
    assert ratios["time_vs_reference_as_run"] == pytest.approx(ours["seconds"] / torchvision_row["seconds_as_run"])
    assert ratios["mIoU"] == pytest.approx(ours["mIoU"] / torchvision_row["mIoU"])

    # The masks: where exactly one instance of a chosen class covers a pixel, that class; where none (nor a
    # crowd region) does, background. Rasterised by pycocotools, cropped and resized here on their own.
    coco_root = shared_data / "coco128"
    seg = tmp_path / "seg"
    write_voc_segmentation(coco_root, seg, seed=5)
    coco = COCO(str(coco_root / "annotations" / "instances_train2017.json"))
    label = {c["id"]: data["class_names"].index(c["name"]) for c in coco.cats.values()
             if c["name"] in data["class_names"]}
    val = (seg / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    image_id = max((int(stem) for stem in val), key=lambda i: (  # the val photo with the most classes, instances
        len({a["category_id"] for a in coco.imgToAnns[i] if a["category_id"] in label}),
        sum(a["category_id"] in label for a in coco.imgToAnns[i])))
    info = coco.imgs[image_id]
    width, height = info["width"], info["height"]
    w, h = (round(height * 4 / 3), height) if width * 3 > height * 4 else (width, round(width * 3 / 4))
    box = ((width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h)

    def resized(region: np.ndarray) -> np.ndarray:
        return np.array(Image.fromarray(region.astype(np.uint8)).crop(box).resize((480, 360), Image.NEAREST))

    anns = [a for a in coco.imgToAnns[image_id] if a["category_id"] in label]
    covers = [(label[a["category_id"]], a.get("iscrowd", 0), resized(coco.annToMask(a))) for a in anns]
    count = sum(region for _, _, region in covers)
    written = np.array(Image.open(seg / "SegmentationClass" / f"{image_id:012d}.png"))
    assert len({c for c, _, _ in covers}) >= 2  # the photo shows at least two classes
    assert (written[count == 0] == 0).all()
    for cls, crowd, region in covers:
        alone = (region == 1) & (count == 1)
        assert alone.sum() > 0 and (written[alone] == (255 if crowd else cls)).all()


def test_time_split_books_each_interval_under_the_event_that_ends_it():
    import datetime

    from benchmarks.own_data import time_split

    def stamp(seconds: float) -> str:
        return f"2026-01-01 00:00:{seconds:06.3f}".replace(".", ",")

    log = "\n".join(f"[{stamp(t)}][{name}][INFO] - {text}" for t, name, text in [
        (2.0, "__main__", "learning rate 0.0005 (...)"),
        (3.5, "__main__", "amp=auto: ..."),
        (13.5, "tasks.training.engine", "epoch 1: loss=2.4, images_per_s=1.0"),
        (23.0, "tasks.training.engine", "epoch 2: loss=2.1, images_per_s=1.1"),
        (27.0, "tasks.training.engine", "epoch 2 val: mIoU=0.0100"),
        (28.5, "tasks.training.engine", "evaluation report: /tmp/x/report.html"),
        (29.0, "__main__", "checkpoints and logs in /tmp/x"),
    ]) + "\nfinal metrics: mIoU=0.0100\n"
    launched = datetime.datetime(2026, 1, 1).timestamp() + 0.5
    split = time_split(log, launched, launched + 30.0)
    # start-up to the line before the first epoch ends (3.5 - 0.5), epochs 10 + 9.5, evaluation 4, report 1.5,
    # the rest (the last log line is no event) to exit: 30.5 - 28.5.
    assert split == pytest.approx({"startup": 3.0, "train": 19.5, "evaluate": 4.0, "report": 1.5, "finish": 2.0})
    assert sum(split.values()) == pytest.approx(30.0)
    assert time_split("no log lines", launched, launched + 7.0)["startup"] == pytest.approx(7.0)


@pytest.mark.slow  # writes the 128-photo set: ~10-20 s on 2 shared cores
def test_finetune_seg_records_a_failed_contender_and_still_scores_the_others(shared_data, tmp_path, monkeypatch):
    from benchmarks import finetune_seg

    def reference(name, train, epochs, workers, seed, val=None):
        return {"seconds": 2.0, "time_split": {"build": 0.5, "train": 1.5},
                "predict": lambda image: np.zeros(image.shape[:2], dtype=np.int64)}  # all background

    def ours(*args):
        raise RuntimeError("our training failed (...):\nNonFiniteLossError: loss became nan at step 3")

    monkeypatch.setattr(finetune_seg, "train_reference", reference)
    monkeypatch.setattr(finetune_seg, "train_ours", ours)
    result = finetune_seg.run(shared_data / "coco128", 1, torch.get_num_threads(), 0, 5, tmp_path,
                              ["lraspp_mobilenet_v3_large"], log=lambda line: None)
    peer, failed = result["rows"]
    assert failed["failed"] == "NonFiniteLossError: loss became nan at step 3" and "mIoU" not in failed
    assert result["ours_over_torchvision"] == {}
    # All background: IoU(background) = its share of the labelled val pixels = pixel accuracy; every class
    # present in the val masks counts (IoU 0), the others are left out.
    present = sum(not np.isnan(v) for v in peer["IoU"].values())
    assert peer["pixel_acc"] == pytest.approx(peer["IoU"]["background"])
    assert peer["mIoU"] == pytest.approx(peer["pixel_acc"] / present)
    assert "failed after" in finetune_seg.table(result)
