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

from benchmarks import detection, run, segmentation  # noqa: E402
from benchmarks.timing import interleaved, paired_ratio, summarise  # noqa: E402

TINY = run.Plan(
    detection.DetectionSettings(input_size=64, num_classes=3, train_batch=2, infer_batch=1, train_repeats=1,
                                train_warmup=1, infer_repeats=1, warmup=0),
    segmentation.SegmentationSettings(input_size=65, num_classes=4, repeats=1, warmup=0),
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
        returned = run.main(["--quick", "--threads", "1", "--out", str(out)])
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
    assert [(r["task"], r["role"]) for r in rows] == [("detection", "ours"), ("detection", "peer")] * 2 + [
        ("segmentation", "ours"), ("segmentation", "peer")] * 2
    for row in rows:
        assert len(row["samples_ms"]) == 1 and row["time_ms"]["median"] == row["samples_ms"][0] > 0
        assert row["params"] > 0 and row["madds"] > 0
        assert (row["ratio"] is None) == (row["role"] == "peer")
        assert row["model"] in printed
    for ours, peer in zip(rows[::2], rows[1::2]):
        assert ours["ratio"]["median"] == pytest.approx(ours["samples_ms"][0] / peer["samples_ms"][0])
    assert len(results["comparisons"]) == 4

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
    for row in rows[4:]:
        if row["role"] == "peer":
            model = peers[row["model"]](weights=None, weights_backbone=None, num_classes=4)
            assert row["params"] == sum(p.numel() for p in model.parameters())
    assert all(shape == [1, 65, 65] for shape in results["checks"]["segmentation"]["mask_shapes"].values())


def test_bad_thread_count_is_refused():
    with pytest.raises(SystemExit):
        run.parse_args(["--threads", "0"])
