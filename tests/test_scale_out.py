"""torchrun + DDP on CPU (gloo), and exact resume after kill -9: the real CLI in subprocesses."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, tiny_shapes_overrides

from tasks.evaluate import evaluate_checkpoint
from tasks.training.checkpoint import CheckpointError, load_checkpoint
from tasks.training.loaders import EpochSampler


def _train_cmd(run_dir, *overrides):
    return [sys.executable, "-m", "tasks.train", *overrides, f"hydra.run.dir={run_dir}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_torchrun_two_ranks_stay_identical_and_evaluate_like_one_process(tmp_path):
    data = tiny_shapes_overrides(tmp_path / "shapes_det", "coco", num_train=16, num_val=6, size=64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tasks.train", "experiment=demo_ssdlite_shapes", "backbone.width_mult=0.35", *data,
           "epochs=2", "batch_size=4", "eval_batch_size=1", "eval_every=1", "check_sync_every=1", "threads=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # 16 images / (2 ranks x 4) = 2 steps per epoch, checked after each of the 4 steps
    assert "weights identical on all 2 ranks at each of 4 checks" in output, output[-3000:]
    state = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert state["step"] == 4
    distributed_ap = state["history"][-1]["val/AP"]
    # one image per forward pass and one thread on both sides, so each image meets the same kernels:
    # the only difference left is how the ranks' detections were gathered and merged
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_checkpoint(tmp_path / "run" / "last.ckpt", tmp_path / "eval", batch_size=1,
                                     num_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert single["AP"] == pytest.approx(distributed_ap, abs=1e-12)
    assert single["AR100"] == pytest.approx(state["history"][-1]["val/AR100"], abs=1e-12)


def test_epoch_sampler_shards_without_overlap_and_resumes_mid_epoch(monkeypatch):
    from tasks.training import distributed

    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        sampler = EpochSampler(11, shuffle=True, seed=3, drop_uneven=True)
        sampler.set_epoch(5)
        shards.append(sampler.indices())
        sampler.set_epoch(5, start=2)
        assert sampler.indices() == shards[-1][2:]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0]) & set(shards[1])
    eval_sampler = EpochSampler(11, shuffle=False, seed=3, drop_uneven=False)
    assert len(eval_sampler.indices()) == 5  # rank 1 of 2 keeps 1, 3, ..., 9: no padding duplicates


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    data = tiny_shapes_overrides(tmp_path / "shapes_det", "coco", num_train=32, num_val=4, size=64)
    common = ["experiment=demo_ssdlite_shapes", "backbone.width_mult=0.35", *data, "epochs=3", "batch_size=4",
              "eval_every=3", "checkpoint_every_steps=1", "deterministic=true", "ema_decay=0.9", "threads=1",
              "dataset.train.transforms.iou_crop=true", "dataset.train.transforms.zoom_out=true"]
    total_steps = 3 * 32 // 4
    straight = subprocess.run(_train_cmd(tmp_path / "straight", *common), cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=_env())
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run_dir, *common), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            step = load_checkpoint(run_dir / "last.ckpt")["step"]
        except CheckpointError:
            step = 0
        if step >= 11:  # in the second epoch (8 steps per epoch)
            proc.send_signal(signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_at < total_steps

    resumed = subprocess.run(_train_cmd(run_dir, *common, "resume=true"), cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "straight" / "last.ckpt"), load_checkpoint(run_dir / "last.ckpt")
    assert a["step"] == b["step"] == total_steps
    for key in ("model", "train_model"):  # the EMA weights and the raw ones
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resuming"
    assert a["history"][-1]["val/AP"] == b["history"][-1]["val/AP"]
