"""Loggers and learning-rate schedules are config groups with _target_s: any combination of loggers at
once, a user's own schedule by its target, and the built-in ones checked against hand-computed values."""
import csv
import math

import numpy as np
import pytest
import torch
from helpers import compose_train
from PIL import Image

from tasks.training.loggers import CSVLogger, Loggers, TensorBoardLogger, build_loggers
from tasks.training.optim import scheduler_from_config


def user_constant_schedule(total_steps: int, warmup_steps: int, level: float = 0.5):
    """A user's own schedule: the contract is (total_steps, warmup_steps, **options) -> factor(step)."""
    return lambda step: level if step >= warmup_steps else 1.0


def lrs(schedule: dict, total_steps: int = 10, steps_per_epoch: int = 2, lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = scheduler_from_config(optimizer, schedule, total_steps, steps_per_epoch)
    values = []
    for _ in range(total_steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_step_schedule_drops_by_gamma_at_each_milestone():
    cfg = compose_train(["schedule=step", "schedule.warmup_epochs=0"])
    got = lrs(dict(cfg.schedule), total_steps=10)
    # milestones at 0.67 and 0.89 of 10 steps -> steps 7 and 9
    assert got == pytest.approx([1.0] * 7 + [0.1] * 2 + [0.01])


def test_cosine_and_poly_from_their_configs_match_the_formulas():
    cosine = lrs(dict(compose_train(["schedule.warmup_epochs=0"]).schedule), total_steps=8)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])
    poly = lrs(dict(compose_train(["schedule=poly"]).schedule), total_steps=8)
    assert poly == pytest.approx([(1 - s / 8) ** 0.9 for s in range(8)])


def test_a_users_own_schedule_by_target_and_warmup_in_epochs():
    schedule = {"_target_": f"{__name__}.user_constant_schedule", "warmup_epochs": 1.5, "level": 0.25}
    assert lrs(schedule, total_steps=6, steps_per_epoch=2) == pytest.approx([1, 1, 1, 0.25, 0.25, 0.25])


def test_a_schedule_node_from_before_targets_still_builds():
    assert lrs({"name": "poly", "warmup_epochs": 0.0, "power": 1.0}, total_steps=4) == pytest.approx(
        [1, 0.75, 0.5, 0.25])


def test_csv_logger_writes_a_tidy_table_and_pngs(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_scalars("train", {"loss": 1.5, "lr": 0.01, "bad": float("nan"), "flag": True}, 10)
    logger.log_scalars("val", {"AP": 0.25}, 20)
    picture = np.zeros((6, 8, 3), np.uint8)
    picture[2, 3] = (255, 0, 0)
    logger.log_images({"val/pr curve": picture, "val/pil": Image.fromarray(picture)}, 20)
    logger.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["tag"], float(r["value"])) for r in rows] == [
        ("10", "train/loss", 1.5), ("10", "train/lr", 0.01), ("20", "val/AP", 0.25)]
    saved = np.asarray(Image.open(tmp_path / "images" / "val_pr_curve" / "00000020.png"))
    assert np.array_equal(saved, picture)


def test_any_combination_of_loggers_from_the_config(tmp_path):
    cfg = compose_train(["logger=[tensorboard,csv]"])
    loggers = build_loggers(cfg.logger, tmp_path, config={"seed": 0})
    assert [type(x) for x in loggers.loggers] == [TensorBoardLogger, CSVLogger]
    loggers.log_scalars("val", {"AP": 0.5}, 1)
    loggers.log_images({"val/picture": np.zeros((4, 4, 3), np.uint8)}, 1)
    loggers.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.value for e in events.Scalars("val/AP")] == [0.5] and events.Images("val/picture")
    assert (tmp_path / "metrics.csv").is_file()
    assert build_loggers(compose_train(["logger=[]"]).logger, tmp_path).loggers == []  # the schema keeps the key


def test_mlflow_logger_records_metrics_params_and_images(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'mobilevision[mlflow]')")
    from mlflow.tracking import MlflowClient

    cfg = compose_train(["logger=mlflow"])
    loggers = build_loggers(cfg.logger, tmp_path, config={"optim": {"lr": 0.1}})
    loggers.log_scalars("val", {"AP": 0.5}, 3)
    loggers.log_images({"val/picture": np.zeros((4, 4, 3), np.uint8)}, 3)
    loggers.close()
    mlflow_logger = loggers.loggers[0]
    client = MlflowClient(mlflow_logger.tracking_uri)
    assert mlflow_logger.tracking_uri.startswith("file:") and (tmp_path / "mlruns").is_dir()
    assert [(m.step, m.value) for m in client.get_metric_history(mlflow_logger.run_id, "val/AP")] == [(3, 0.5)]
    run = client.get_run(mlflow_logger.run_id)
    assert run.data.params == {"optim.lr": "0.1"} and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(mlflow_logger.run_id, "images")] == [
        "images/val_picture_00000003.png"]


def test_wandb_logger_runs_offline_into_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'mobilevision[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = build_loggers(compose_train(["logger=wandb"]).logger, tmp_path, config={"seed": 0})
    loggers.log_scalars("val", {"AP": 0.5}, 3)
    loggers.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_the_engine_logs_through_the_loggers_object():
    from tasks.training.engine import Engine, EngineOptions

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_scalars(self, prefix, values, step):
            self.calls.append((prefix, dict(values), step))

    recorder = Recorder()
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), [], None,
                    lambda: None, "unused", EngineOptions(epochs=1), torch.device("cpu"), loggers=Loggers([recorder]))
    engine._scalars("val", {"AP": 0.5}, 7)
    assert recorder.calls == [("val", {"AP": 0.5}, 7)] and engine._writer is None
