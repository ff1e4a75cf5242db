"""num_workers=auto: no worker processes beside a CPU training step on a small machine, workers for a GPU,
an explicit number left alone (tasks/training/workers.py)."""
import logging

import pytest
from helpers import compose_train, tiny_shapes_overrides

from tasks.train import train
from tasks.training.workers import plan_loader


@pytest.mark.parametrize("cores,processes,workers,threads", [
    (2, 1, 0, None),    # this machine: loading between steps, every core for the step
    (4, 1, 0, None),
    (8, 1, 1, 7),       # one worker per 8 cores, on a core the step gives up
    (16, 1, 2, 14),
    (64, 1, 8, 56),
    (16, 2, 1, None),   # torchrun on one machine: 8 cores per process; torchrun sets each one's threads
])
def test_auto_on_a_cpu(cores, processes, workers, threads):
    plan = plan_loader("auto", "cpu", None, cores, processes)
    assert (plan.workers, plan.threads) == (workers, threads)


def test_auto_on_a_gpu_feeds_it_from_every_core_but_one():
    assert plan_loader("auto", "cuda", None, 16).workers == 8
    assert plan_loader("auto", "cuda", None, 4).workers == 3
    assert plan_loader("auto", "cuda", None, 1).workers == 1
    assert plan_loader("auto", "cuda", None, 16, processes=8).workers == 1


def test_explicit_settings_are_kept():
    assert (plan_loader(3, "cpu", None, 2).workers, plan_loader(3, "cpu", None, 2).threads) == (3, None)
    assert plan_loader("auto", "cpu", 5, 16).threads == 5  # the user's threads win


def test_training_logs_the_choice(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("tasks.train.usable_cores", lambda: 2)
    tiny = [o for o in tiny_shapes_overrides(tmp_path / "shapes", "coco", 8, 4, 64) if not o.startswith("num_workers")]
    cfg = compose_train(["experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
                         "head.extra_depths=[32,32]", "report=false", *tiny, "num_workers=auto"])
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train(cfg, tmp_path / "run")
    assert "num_workers=auto: loading in the training process between steps" in caplog.text
