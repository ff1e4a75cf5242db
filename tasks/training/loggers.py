"""Where a run's scalars and pictures go: TensorBoard, CSV, MLflow, Weights & Biases, or several at once.

The engine sees one `Loggers` object: `log_scalars(prefix, values, step)`, `log_images(tag_to_image, step)`
and `close()`. Each backend is a config in conf/logger/ with a `_target_` taking `run_dir` (and `config`,
the resolved training config, when it wants to record it); `logger=[tensorboard,csv]` picks several.
A user's own logger is any class with the same three methods, named by its config's `_target_`.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray


def _finite_scalars(prefix: str, values: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [(f"{prefix}/{name}", float(value)) for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]


def _as_array(image: ImageLike) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W]) whatever the picture came as."""
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)


def _file_name(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)


class TensorBoardLogger:
    """Event files under <run_dir>/<subdir>; the writer is created on the first call."""

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard"):
        self.log_dir = Path(run_dir) / subdir
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.log_dir)
        return self._writer

    def log_scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for tag, value in _finite_scalars(prefix, values):
            self.writer.add_scalar(tag, value, step)

    def log_images(self, tag_to_image: Mapping[str, ImageLike], step: int) -> None:
        for tag, image in tag_to_image.items():
            array = _as_array(image)
            self.writer.add_image(tag, array, step, dataformats="HWC" if array.ndim == 3 else "HW")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class CSVLogger:
    """One row per value: time, step, tag, value (a tidy table that never needs rewriting when a
    new metric appears); pictures as PNGs under <run_dir>/<image_dir>/<tag>/<step>.png."""

    FIELDS = ("time", "step", "tag", "value")

    def __init__(self, run_dir: str | Path, filename: str = "metrics.csv", image_dir: str = "images"):
        self.path = Path(run_dir) / filename
        self.image_dir = Path(run_dir) / image_dir

    def log_scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        rows = _finite_scalars(prefix, values)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.FIELDS)
            now = round(time.time(), 3)
            writer.writerows((now, int(step), tag, repr(value)) for tag, value in rows)

    def log_images(self, tag_to_image: Mapping[str, ImageLike], step: int) -> None:
        for tag, image in tag_to_image.items():
            path = self.image_dir / _file_name(tag) / f"{int(step):08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_as_array(image)).save(path)

    def close(self) -> None:
        pass


class MLflowLogger:
    """An MLflow run in a local file store (<run_dir>/mlruns unless tracking_uri says otherwise, e.g.
    sqlite:///mlflow.db or a server); needs the `mlflow` extra (mlflow or mlflow-skinny). MLflow 3 keeps the
    file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for a file:// store."""

    def __init__(self, run_dir: str | Path, experiment: str = "mobilevision", tracking_uri: str | None = None,
                 run_name: str | None = None, config: Mapping[str, Any] | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or (Path(run_dir).resolve() / "mlruns").as_uri()
        if self.tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name or Path(run_dir).name).info.run_id
        for key, value in _flat(config or {}):
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log_scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for tag, value in _finite_scalars(prefix, values):
            self.client.log_metric(self.run_id, tag, value, step=int(step))

    def log_images(self, tag_to_image: Mapping[str, ImageLike], step: int) -> None:
        for tag, image in tag_to_image.items():
            self.client.log_image(self.run_id, _as_array(image), f"images/{_file_name(tag)}_{int(step):08d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbLogger:
    """A Weights & Biases run in offline mode by default (files under <run_dir>/wandb, `wandb sync` uploads
    them later); needs the `wandb` extra."""

    def __init__(self, run_dir: str | Path, project: str = "mobilevision", mode: str = "offline",
                 name: str | None = None, config: Mapping[str, Any] | None = None):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(run_dir), name=name or Path(run_dir).name,
                              config=dict(config or {}), reinit=True)

    def log_scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        rows = dict(_finite_scalars(prefix, values))
        if rows:
            self.run.log(rows | {"step": int(step)})

    def log_images(self, tag_to_image: Mapping[str, ImageLike], step: int) -> None:
        self.run.log({tag: self._wandb.Image(_as_array(image)) for tag, image in tag_to_image.items()}
                     | {"step": int(step)})

    def close(self) -> None:
        self.run.finish()


def _flat(node: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class Loggers:
    """Every configured logger behind the three calls the engine makes."""

    def __init__(self, loggers: Iterable[Any] = ()):
        self.loggers = list(loggers)

    def log_scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_scalars(prefix, values, step)

    def log_images(self, tag_to_image: Mapping[str, ImageLike], step: int) -> None:
        for logger in self.loggers:
            logger.log_images(tag_to_image, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(logger_cfg: Mapping[str, Any] | None, run_dir: str | Path,
                  config: Mapping[str, Any] | None = None) -> Loggers:
    """`cfg.logger` ({name: {_target_, ...}}, what conf/logger/*.yaml compose to) -> Loggers.
    Each target gets `run_dir`, and `config` too when its signature takes it."""
    import inspect

    from hydra.utils import get_object
    from omegaconf import DictConfig, OmegaConf

    if isinstance(logger_cfg, DictConfig):
        logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
    loggers = []
    for name, node in (logger_cfg or {}).items():
        if not node:  # logger.csv=null switches one off
            continue
        options = dict(node)
        target = options.pop("_target_", None)
        if target is None:
            from tasks.errors import ConfigError
            raise ConfigError(f"logger.{name} has no _target_; expected a class like tasks.training.loggers.CSVLogger.")
        factory = get_object(target)
        if config is not None and "config" in inspect.signature(factory).parameters:
            options.setdefault("config", dict(config))
        loggers.append(factory(run_dir=run_dir, **options))
    return Loggers(loggers)
