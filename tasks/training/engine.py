"""The task-agnostic training loop: detection and segmentation both run through it.

The model follows the head contract (forward -> outputs, loss(outputs, targets) -> named terms,
predict(outputs, sizes) -> results); datasets give `evaluator()` objects. Everything a run
writes goes to `run_dir` (Hydra's run directory); only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from tasks.detection.device_augment import PlannedBatch
from tasks.errors import DataError
from tasks.training import distributed as dist
from tasks.training.checkpoint import load_checkpoint, save_checkpoint
from tasks.training.ema import warmup_ema_multi_avg_fn
from tasks.training.evaluation import AMP_DTYPES, evaluate, to_device, unwrap
from tasks.training.loaders import set_loader_epoch
from tasks.training.rng import rng_state, set_rng_state

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
    amp: str | None = None               # None, "bf16" or "fp16" (fp16 only on GPU, with a grad scaler)
    channels_last: bool = False
    compile: bool = False
    ema_decay: float | None = None       # e.g. 0.9998, warmed up (ema.py); the EMA is evaluated and saved as best
    checkpoint_every_steps: int = 0      # also write last.ckpt inside an epoch (for exact resume)
    check_sync_every: int = 0            # DDP: compare the ranks' weights bit for bit every N steps
    max_bad_samples: int = 10            # unreadable files skipped (with a warning) before the run stops
    report: bool = True                  # per-class tables, PR curves, confusion matrix, worst images per evaluation


def weights_digest(model: nn.Module) -> str:
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten().double().cpu() for p in unwrap(model).parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


class Engine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, train_loader: DataLoader,
                 val_loader: DataLoader | None, evaluator_factory: Callable[[], Any], run_dir: str | Path,
                 options: EngineOptions, device: torch.device, config: dict | None = None, loggers: Any = None,
                 artifact: dict | None = None):
        self.options = options
        self.device = device
        if options.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.forward_model = torch.compile(model) if options.compile else model
        self.ema = (AveragedModel(unwrap(model), multi_avg_fn=warmup_ema_multi_avg_fn(options.ema_decay),
                                  use_buffers=True) if options.ema_decay else None)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.evaluator_factory = evaluator_factory
        self.run_dir = Path(run_dir)
        self.config = config or {}
        self.artifact = artifact or {}  # what the checkpoint says about itself (tasks/training/artifact.py)
        if options.amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp={options.amp!r} is not supported; expected null, bf16 or fp16.")
        if options.amp == "fp16" and device.type != "cuda":
            raise ValueError("amp=fp16 needs a GPU (its grad scaler is CUDA-only); use amp=bf16 on CPU.")
        self.scaler = torch.amp.GradScaler("cuda") if options.amp == "fp16" else None
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_metric: float | None = None
        self.primary_metric: str | None = None
        self.history: list[dict[str, float]] = []
        self.sync_checks = 0
        self.skipped: dict[str, None] = {}  # distinct messages, in order
        self._writer = None
        self._evaluator = None  # the last evaluation's, read by its report
        self.loggers = loggers  # tasks.training.loggers.Loggers; None = TensorBoard only, as before

    # -- logging ---------------------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.run_dir / "tensorboard")
        return self._writer

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.loggers is not None:
            if dist.is_main():
                self.loggers.log_scalars(prefix, values, step)
        elif self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def _log_images(self, images: dict, step: int) -> None:
        """tag -> PIL image or uint8 [H, W, 3] array, to every logger that takes pictures."""
        if self.loggers is not None:
            if dist.is_main():
                self.loggers.log_images(images, step)
        elif self.writer is not None:
            import numpy as np

            for tag, image in images.items():
                self.writer.add_image(tag, np.asarray(image.convert("RGB") if hasattr(image, "convert") else image),
                                      step, dataformats="HWC")

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """What gets evaluated and deployed: the EMA of the weights when enabled."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.eval_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                 "batch_in_epoch": self.batch_in_epoch, "step": self.step, "best_metric": self.best_metric,
                 "primary_metric": self.primary_metric, "history": self.history, "config": self.config,
                 "artifact": self.artifact, "rng": rng_state()}
        if self.ema is not None:
            state["train_model"] = unwrap(self.model).state_dict()
            state["ema_updates"] = self.ema.n_averaged
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save(self, name: str) -> Path | None:
        if not dist.is_main():
            return None
        return save_checkpoint(self.state_dict(), self.run_dir / name)

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        unwrap(self.model).load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.copy_(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state.get("batch_in_epoch", 0), state["step"]
        self.best_metric, self.primary_metric = state["best_metric"], state.get("primary_metric")
        self.history = state.get("history", [])
        set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, self.epoch, self.batch_in_epoch, self.step)

    # -- loops -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        last_metrics: dict[str, float] = {}
        while self.epoch < self.options.epochs:
            train_stats = self.train_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0
            record = {"epoch": self.epoch, **{f"train/{k}": v for k, v in train_stats.items()}}
            if self.val_loader is not None and (self.epoch % self.options.eval_every == 0
                                                or self.epoch == self.options.epochs):
                last_metrics = {k: float(v) for k, v in self.evaluate().items()}
                if dist.is_main():
                    headline = {k: v for k, v in last_metrics.items() if "/" not in k}
                    log.info("epoch %d val: %s", self.epoch, ", ".join(f"{k}={v:.4f}" for k, v in headline.items()))
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
                if self.options.report and dist.is_main():
                    try:
                        self._write_report(last_metrics)
                    except (OSError, ValueError) as err:  # a picture is not worth the run: say so and go on
                        log.warning("the evaluation report of epoch %d was not written: %s", self.epoch, err)
            else:
                self.history.append(record)
                self.save("last.ckpt")
        if self._writer is not None:
            self._writer.close()
        if self.loggers is not None and dist.is_main():
            self.loggers.close()
        return last_metrics

    def _autocast(self):
        if self.options.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.options.amp])

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        set_loader_epoch(self.train_loader, self.epoch, self.batch_in_epoch)
        totals: dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.options.epochs}",
                   disable=not (self.options.progress and dist.is_main()), dynamic_ncols=True, leave=False)
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True)
            if isinstance(images, PlannedBatch):  # transforms with device_augment=true: augmented on the device
                images, targets = self.train_loader.dataset.transforms.device_augment.paint(images, targets)
            elif images.dtype == torch.uint8:  # transforms with normalize=false: normalised on the device
                images = self.train_loader.dataset.transforms.device_normalize(images)
            if self.options.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            self._count_skipped(targets)
            targets = to_device(targets, self.device)
            with self._autocast():
                outputs = self.forward_model(images)
            if self.options.amp is not None:  # the loss (softmax, hard-negative ranking, box codes) in fp32
                outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                           for k, v in outputs.items()}
            losses = unwrap(self.model).loss(outputs, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                self._stop_on_non_finite(loss, losses, targets)
            self._optimizer_step(loss)
            self.step += 1
            self.batch_in_epoch += 1
            seen += images.shape[0]
            values = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(loss.detach())}
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v * images.shape[0]
            rate = seen * dist.world_size() / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{rate:.1f}")
            if self.step % self.options.log_every == 0:
                self._scalars("train", values | {"lr": self.optimizer.param_groups[0]["lr"],
                                                 "images_per_s": rate}, self.step)
            if self.options.check_sync_every and self.step % self.options.check_sync_every == 0:
                self._check_ranks_in_sync()
            if self.options.checkpoint_every_steps and self.step % self.options.checkpoint_every_steps == 0:
                self.save("last.ckpt")
        bar.close()
        stats = {k: v / max(seen, 1) for k, v in totals.items()}
        stats["images_per_s"] = seen * dist.world_size() / max(time.perf_counter() - start, 1e-9)
        if dist.is_main():
            log.info("epoch %d: %s", self.epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        return stats

    def _count_skipped(self, targets: list[dict]) -> None:
        for target in targets:
            self.skipped.update(dict.fromkeys(target.get("skipped", ())))
        if len(self.skipped) > self.options.max_bad_samples:
            shown = "; ".join(m.rstrip(".") for m in list(self.skipped)[:5])
            raise DataError(f"stopped at step {self.step + 1}: {len(self.skipped)} files could not be read "
                            f"(more than max_bad_samples={self.options.max_bad_samples}): {shown}"
                            f"{' ...' if len(self.skipped) > 5 else ''}; the last checkpoint is kept.")

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.options.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))

    def _check_ranks_in_sync(self) -> None:
        digests = dist.all_gather_objects(weights_digest(self.model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights after step {self.step}: digests {digests}.")
        self.sync_checks += 1

    def _stop_on_non_finite(self, loss: torch.Tensor, losses: dict, targets: list[dict]) -> None:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        ids = [t.get("image_id") for t in targets]
        ids = [int(i) if torch.is_tensor(i) else i for i in ids]
        last = self.run_dir / "last.ckpt"
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"loss became {float(loss)} at step {self.step + 1} (epoch {self.epoch + 1}) "
                                 f"with {terms} on images {ids}; {kept}.")

    def _write_report(self, metrics: dict[str, float]) -> None:
        """The evaluation's pictures and report.html in reports/epoch_NNN/, the pictures also to TensorBoard."""
        from tasks.analysis.evaluation_report import normalisation, write_config, write_evaluation_report

        directory = self.run_dir / "reports" / f"epoch_{self.epoch:03d}"
        mean, std = normalisation(self.config)
        report = write_evaluation_report(
            self._evaluator, self.val_loader.dataset, metrics, directory,
            title=f"evaluation after epoch {self.epoch} (step {self.step})", checkpoint=self.run_dir / "last.ckpt",
            config=write_config(self.config, directory / "config.yaml") if self.config else None, mean=mean, std=std,
            notes=[f"last.ckpt holds these weights only until the next epoch is saved (best.ckpt keeps the best); "
                   f"run folder {self.run_dir}"])
        self._log_images({f"report/{name}": image for name, image in report.pictures.items()}, self.epoch)
        log.info("evaluation report: %s", report.html)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        evaluator = self.evaluator_factory()
        if self.options.report:
            from tasks.analysis.evaluation_report import for_report

            evaluator = for_report(evaluator)
        self._evaluator = evaluator
        self.primary_metric = evaluator.primary
        dist.broadcast_buffers(self.eval_model)
        # fp32 whatever the training precision: the metric is that of the saved weights as predict and export run them
        return evaluate(self.eval_model, self.val_loader, evaluator, self.device, progress=self.options.progress,
                        channels_last=self.options.channels_last)
