"""The real entry points end to end on small shapes sets written in the real COCO / VOC layouts."""
import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, compose_train, tiny_shapes_overrides

from tasks.evaluate import evaluate_checkpoint
from tasks.train import train
from tasks.training.checkpoint import load_checkpoint

TASKS = {
    "detection": ("demo_ssdlite_shapes", "shapes_det", "AP"),
    "segmentation": ("demo_deeplabv3_shapes", "shapes_seg", "mIoU"),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_writes_checkpoints_and_evaluate_reproduces_the_metric(task, tmp_path):
    experiment, dataset, metric = TASKS[task]
    cfg = compose_train([f"experiment={experiment}", "epochs=1", "batch_size=4", "eval_every=1",
                         *tiny_shapes_overrides(tmp_path / dataset, "coco" if task == "detection" else "voc")])
    metrics = train(cfg, tmp_path / "run")
    assert math.isfinite(metrics[metric])
    for name in ("last.ckpt", "best.ckpt"):
        state = load_checkpoint(tmp_path / "run" / name)
        assert state["epoch"] == 1 and state["step"] == 16 // 4
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    again = evaluate_checkpoint(tmp_path / "run" / "best.ckpt", tmp_path / "eval", batch_size=3, num_workers=0,
                                progress=False)
    # Another batch size picks other CPU conv kernels, so logits differ in the last bits; an untrained
    # detector's near-tied scores then reorder a few detections (seen: 2.9e-6 of AP at AP=0.0011).
    assert again[metric] == pytest.approx(metrics[metric], abs=1e-4)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())[metric] == pytest.approx(again[metric])
    if task == "detection":
        detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
        assert all({"image_id", "category_id", "bbox", "score"} <= set(d) for d in detections)


def test_backbone_swap_trains_through_the_cli(tmp_path):
    """`backbone=mobilenet_v1` on the default detection run: nothing else changes."""
    overrides = tiny_shapes_overrides(tmp_path / "shapes_det", "coco", num_train=8, num_val=4, size=64)
    result = subprocess.run([sys.executable, "-m", "tasks.train", "backbone=mobilenet_v1",
                             "backbone.width_mult=0.25", "epochs=1", "batch_size=4", *overrides,
                             f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final metrics: AP=" in result.stdout
    state = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert state["config"]["backbone"]["_target_"] == "backbones.MobileNetV1"
    assert state["model"]["backbone.blocks.12.pw.conv.weight"].shape[0] == 256  # 1024 x 0.25


def _overfit(tmp_path, experiment, dataset, kind, extra):
    """Train and evaluate on the same few images: a correct model/loss/decoder must fit them."""
    split = "train2017" if kind == "coco" else "train"
    same_split = ([f"dataset.val.image_dir=${{dataset.root}}/{split}",
                   f"dataset.val.ann_file=${{dataset.root}}/annotations/instances_{split}.json"]
                  if kind == "coco" else ["dataset.val.image_set=train"])
    cfg = compose_train([f"experiment={experiment}", *tiny_shapes_overrides(tmp_path / dataset, kind, 8, 4, 128),
                         *same_split, *extra])
    torch.manual_seed(0)
    return train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_ssdlite_overfits_a_few_shapes_images(tmp_path):
    metrics = _overfit(tmp_path, "demo_ssdlite_shapes", "shapes_det", "coco",
                       ["backbone.width_mult=0.5", "batch_size=8", "epochs=300", "eval_every=300",
                        "+dataset.train.transforms.photometric=false", "+dataset.train.transforms.hflip=false",
                        "optim.optimizer.lr=0.003", "schedule.warmup_epochs=10"])
    assert metrics["AP"] >= 0.9, metrics


@pytest.mark.slow
def test_deeplabv3_overfits_a_few_shapes_images(tmp_path):
    metrics = _overfit(tmp_path, "demo_deeplabv3_shapes", "shapes_seg", "voc",
                       ["backbone.width_mult=0.5", "batch_size=8", "epochs=100", "eval_every=100",
                        "dataset.train.transforms.scale_range=[1.0,1.0]", "dataset.train.transforms.hflip=false",
                        "optim.optimizer.lr=0.003", "schedule.warmup_epochs=5"])
    assert metrics["mIoU"] >= 0.9, metrics


def test_a_file_that_breaks_mid_run_is_skipped_then_the_run_stops_past_the_limit(tmp_path, caplog):
    from hydra.utils import instantiate

    from tasks.errors import DataError

    overrides = ["experiment=demo_ssdlite_shapes", "backbone.width_mult=0.35", "epochs=1", "batch_size=4",
                 *tiny_shapes_overrides(tmp_path / "shapes_det", "coco", num_train=8, num_val=4, size=64),
                 "check_data=false"]  # files that break after the check (the check itself catches truncation)
    cfg = compose_train(overrides)
    instantiate(cfg.dataset.prepare)
    broken = sorted((tmp_path / "shapes_det" / "train2017").glob("*.jpg"))[:2]
    for path in broken:  # truncated downloads: the header survives, the pixels do not
        path.write_bytes(path.read_bytes()[:300])

    metrics = train(compose_train([*overrides, "max_bad_samples=2"]), tmp_path / "ok")
    assert math.isfinite(metrics["AP"])
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(p.name in warned for p in broken)

    with pytest.raises(DataError) as err:
        train(compose_train([*overrides, "max_bad_samples=1"]), tmp_path / "stopped")
    assert "more than max_bad_samples=1" in str(err.value) and broken[0].name in str(err.value)


def test_multiscale_flip_evaluation_is_an_option_for_segmentation(artifacts, tmp_path):
    from tasks.errors import ConfigError

    checkpoint = artifacts["segmentation"]["checkpoint"]
    plain = evaluate_checkpoint(checkpoint, tmp_path / "plain", num_workers=0, progress=False)
    mf = evaluate_checkpoint(checkpoint, tmp_path / "mf", num_workers=0, progress=False,
                             multiscale_flip=[0.75, 1.0, 1.25])
    assert 0.0 <= mf["mIoU"] <= 1.0 and 0.0 <= plain["mIoU"] <= 1.0
    with pytest.raises(ConfigError, match="multiscale_flip"):
        evaluate_checkpoint(artifacts["detection"]["checkpoint"], tmp_path / "det", num_workers=0,
                            progress=False, multiscale_flip=[1.0])
