"""The task-agnostic training loop: detection and segmentation both run through it.

The model follows the head contract (forward -> outputs, loss(outputs, targets) -> named terms,
predict(outputs, sizes) -> results); datasets give `evaluator()` objects. Everything a run
writes goes to `run_dir` (Hydra's run directory).
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tasks import distributed as dist
from tasks.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the terms and the images."""


@dataclass
class EngineOptions:
    epochs: int
    eval_every: int = 1
    clip_grad_norm: float | None = None
    log_every: int = 20
    progress: bool = True


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(targets: Iterable[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets]


def prediction_sizes(targets: list[dict]) -> list[tuple[int, int]]:
    """Where predictions are compared: a segmentation target's mask (the padded input), else the
    original image (detection boxes are scored in original pixels)."""
    return [tuple(t["mask"].shape[-2:]) if "mask" in t else tuple(int(v) for v in t["orig_size"])
            for t in targets]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


class Engine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, train_loader: DataLoader,
                 val_loader: DataLoader | None, evaluator_factory: Callable[[], Any], run_dir: str | Path,
                 options: EngineOptions, device: torch.device, config: dict | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.evaluator_factory = evaluator_factory
        self.run_dir = Path(run_dir)
        self.options = options
        self.device = device
        self.config = config or {}
        self.epoch = 0
        self.step = 0
        self.best_metric: float | None = None
        self.primary_metric: str | None = None
        self.history: list[dict[str, float]] = []
        self._writer = None

    # -- logging ---------------------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.run_dir / "tensorboard")
        return self._writer

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_metric": self.best_metric, "history": self.history, "config": self.config,
                "rng": rng_state()}

    def save(self, name: str) -> Path | None:
        if not dist.is_main():
            return None
        return save_checkpoint(self.state_dict(), self.run_dir / name)

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_metric, self.history = state["best_metric"], state.get("history", [])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # -- loops -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        last_metrics: dict[str, float] = {}
        while self.epoch < self.options.epochs:
            sampler = getattr(self.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            train_stats = self.train_epoch()
            self.epoch += 1
            record = {"epoch": self.epoch, **{f"train/{k}": v for k, v in train_stats.items()}}
            evaluate_now = self.val_loader is not None and (
                self.epoch % self.options.eval_every == 0 or self.epoch == self.options.epochs)
            if evaluate_now:
                last_metrics = self.evaluate()
                record.update({f"val/{k}": v for k, v in last_metrics.items()})
                self._scalars("val", last_metrics, self.epoch)
                score = last_metrics[self.primary_metric]
                improved = self.best_metric is None or score > self.best_metric
                if improved:
                    self.best_metric = score
                self.history.append(record)
                self.save("last.ckpt")
                if improved:
                    self.save("best.ckpt")
            else:
                self.history.append(record)
                self.save("last.ckpt")
        if self._writer is not None:
            self._writer.close()
        return last_metrics

    def train_epoch(self) -> dict[str, float]:
        model = self.model
        model.train()
        totals: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.options.epochs}",
                   disable=not (self.options.progress and dist.is_main()), dynamic_ncols=True, leave=False)
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True)
            targets = to_device(targets, self.device)
            outputs = model(images)
            losses = unwrap(model).loss(outputs, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                self._stop_on_non_finite(loss, losses, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.options.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), self.options.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            seen += images.shape[0]
            values = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(loss.detach())}
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v * images.shape[0]
            rate = seen * dist.world_size() / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{rate:.1f}")
            if self.step % self.options.log_every == 0:
                self._scalars("train", values | {"lr": self.optimizer.param_groups[0]["lr"],
                                                 "images_per_s": rate}, self.step)
        bar.close()
        stats = {k: v / max(seen, 1) for k, v in totals.items()}
        stats["images_per_s"] = seen * dist.world_size() / max(time.perf_counter() - start, 1e-9)
        if dist.is_main():
            log.info("epoch %d: %s", self.epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        return stats

    def _stop_on_non_finite(self, loss: torch.Tensor, losses: dict, targets: list[dict]) -> None:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        ids = [t.get("image_id") for t in targets]
        ids = [int(i) if torch.is_tensor(i) else i for i in ids]
        last = self.run_dir / "last.ckpt"
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"loss became {float(loss)} at step {self.step + 1} (epoch {self.epoch + 1}) "
                                 f"with {terms} on images {ids}; {kept}.")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        evaluator = self.evaluator_factory()
        self.primary_metric = evaluator.primary
        return evaluate(self.model, self.val_loader, evaluator, self.device, progress=self.options.progress)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, evaluator: Any, device: torch.device,
             progress: bool = True) -> dict[str, float]:
    """Run the model over `loader`, feed the evaluator, gather across processes, compute on rank 0
    and share the result with every rank."""
    model.eval()
    net = unwrap(model)
    for images, targets in tqdm(loader, desc="evaluate", leave=False,
                                disable=not (progress and dist.is_main()), dynamic_ncols=True):
        outputs = net(images.to(device, non_blocking=True))
        predictions = net.predict(outputs, prediction_sizes(targets))
        predictions = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()} for p in predictions]
        evaluator.update(targets, predictions)
    if dist.is_distributed():
        states = dist.all_gather_objects(evaluator.state())
        if dist.is_main():
            evaluator.merge(states[1:])
    metrics = evaluator.compute() if dist.is_main() else None
    return dist.all_gather_objects(metrics)[0] if dist.is_distributed() else metrics
