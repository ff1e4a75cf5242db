"""benchmarks/gpu.py on the CPU at tiny sizes (`--device cpu --quick`): every section's code path runs and the
report holds what it says; a failing section is recorded while the others run; no CUDA -> one sentence, exit 2.

No timed assertions (tests/test_benchmarks_smoke.py's rule): only the structure of the results and ratios that
follow from the recorded samples.
"""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402


def test_dry_run_on_the_cpu_runs_every_section(tmp_path, capsys, one_thread):
    """~10 s on one core: the five sections at QUICK's sizes, on synthetic photos."""
    report = gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    printed = capsys.readouterr().out
    assert list(saved["sections"]) == list(gpu.SECTIONS)
    assert {name: entry["status"] for name, entry in saved["sections"].items()} == dict.fromkeys(gpu.SECTIONS, "ok")
    assert saved["sections"].keys() == report["sections"].keys()
    for name in gpu.SECTIONS:
        assert f"## {name}" in printed

    env = saved["sections"]["environment"]["result"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_count"] >= 1

    det = saved["sections"]["detection_train"]["result"]
    keys = [tuple(r["key"]) for r in det["rows"]]
    # fp16 + GradScaler is CUDA-only; every other configuration on both sides
    assert sorted(keys) == sorted((who, layout, precision) for who in ("ours", "torchvision")
                                  for layout in gpu.LAYOUTS for precision in ("fp32", "bf16"))
    assert det["failures"] == {}
    by_key = {tuple(r["key"]): r for r in det["rows"]}
    for (who, layout, precision), row in by_key.items():
        (sample,) = row["samples_ms"]  # QUICK: one timed round
        assert row["images_per_s"] == pytest.approx(gpu.QUICK.det_batches[0] / (sample / 1e3))
        if who == "ours":
            peer = by_key[("torchvision", layout, precision)]["samples_ms"][0]
            assert row["ours_over_peer"]["median"] == pytest.approx(sample / peer)
        if (layout, precision) != ("NCHW", "fp32"):
            base = by_key[(who, "NCHW", "fp32")]["samples_ms"][0]
            assert row["over_nchw_fp32"]["median"] == pytest.approx(sample / base)

    seg = saved["sections"]["segmentation_train"]["result"]
    assert len(seg["rows"]) == 4 and all(r["key"][0] == "ours" for r in seg["rows"])

    inference = saved["sections"]["inference"]["result"]
    assert inference["nms_pre"] is not None
    assert [(r["regime"], r["path"].split(" + ")[1]) for r in inference["rows"]] == [
        (regime, path) for regime in ("random weights", "realistic scores")
        for path in ("head.predict", "head.predict", "torchvision postprocess_detections")]
    for row in inference["rows"]:  # the median of the per-round ratios
        times = row["samples_ms"]
        assert len(times["post"]) == gpu.QUICK.infer_repeats
        assert row["post_over_network"]["median"] == pytest.approx(
            statistics.median(p / n for p, n in zip(times["post"], times["network"], strict=True)))

    aug = saved["sections"]["augmentation"]["result"]
    assert "synthetic" in aug["source"]
    for task, size in (("detection", gpu.QUICK.aug_det_size), ("segmentation", gpu.QUICK.aug_seg_size)):
        assert aug[task]["size"] == size
        for rate in aug[task]["per_core"].values():
            assert rate["cores_for_2000_images_per_s"] == pytest.approx(2000.0 / rate["images_per_s_per_core"])
        assert set(aug[task]["device"]) == {"paint", "copy + paint"}
    assert len(aug["detection"]["per_core"]) == 3 and len(aug["segmentation"]["per_core"]) == 2


def test_a_failing_section_is_recorded_and_the_budget_skips_the_rest(tmp_path, monkeypatch, capsys):
    def broken(s, clock):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(gpu, "segmentation_train", broken)
    gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "a"), "--only", "environment",
              "--only", "segmentation_train"])
    sections = json.loads((tmp_path / "a" / "gpu.json").read_text())["sections"]
    assert sections["environment"]["status"] == "ok"
    assert sections["segmentation_train"]["status"] == "error"
    assert sections["segmentation_train"]["error"] == "RuntimeError: out of memory, say"
    assert "## segmentation_train: FAILED" in capsys.readouterr().out

    gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "b"), "--budget-s", "0", "--only", "environment",
              "--only", "inference"])
    sections = json.loads((tmp_path / "b" / "gpu.json").read_text())["sections"]
    assert sections["environment"]["status"] == "ok" and sections["inference"]["status"] == "skipped"


def test_refuses_without_cuda_in_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == gpu.NO_CUDA
    assert not (tmp_path / "gpu.json").exists()
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--out", str(tmp_path), "--images", str(tmp_path / "absent")])
    assert "is not a folder" in capsys.readouterr().err
