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
    assert [(r["task"], r["role"]) for r in rows] == [("detection", "ours"), ("detection", "peer")] * 4 + [
        ("segmentation", "ours"), ("segmentation", "peer")] * 2
    for row in rows:
        assert len(row["samples_ms"]) == 1 and row["time_ms"]["median"] == row["samples_ms"][0] > 0
        assert row["params"] > 0 and row["madds"] > 0
        assert (row["ratio"] is None) == (row["role"] == "peer")
        assert row["model"] in printed
    for ours, peer in zip(rows[::2], rows[1::2]):
        assert ours["ratio"]["median"] == pytest.approx(ours["samples_ms"][0] / peer["samples_ms"][0])
    assert len(results["comparisons"]) == 6
    # Training: NCHW, channels_last on both sides, and each side's default (ours channels_last, torchvision NCHW)
    # from the same four contenders of the same rounds.
    train = [r for r in rows if r["measure"].startswith("train step")]
    assert [r["model"] for r in train] == [detection.OURS, detection.PEER, detection.OURS + detection.CL,
                                           detection.PEER + detection.CL, detection.OURS_DEFAULT,
                                           detection.PEER_DEFAULT]
    assert train[4]["samples_ms"] == train[2]["samples_ms"] and train[5]["samples_ms"] == train[1]["samples_ms"]

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
    for row in rows[8:]:
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
    paths = (postprocess.EAGER, postprocess.PEER, postprocess.ORT, postprocess.ORT_SPIN)
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
    # MobileNetV2 SSDLite costs more per image than MobileNetV3-Large's (paper: 0.8 B vs 0.51 B MAdds at 80 classes)
    macs = result["gmacs_per_image"]
    assert macs["ours"] > macs["torchvision"] > 0
    assert result["ours_over_torchvision"]["gmacs"] == pytest.approx(macs["ours"] / macs["torchvision"])
