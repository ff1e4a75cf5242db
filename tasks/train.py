"""Train a model: `python -m tasks.train [experiment=...] [overrides]`. Thin: the engine does the work."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tasks.cli import CONFIG_DIR, run
from tasks.cpu_memory import apply_cpu_memory
from tasks.datasets.check import check_dataset
from tasks.errors import ConfigError, Interrupted, user_errors_exit
from tasks.training import distributed as dist
from tasks.training.artifact import artifact_of_dataset
from tasks.training.checkpoint import load_checkpoint, load_model_weights
from tasks.training.config_checks import check_train_config, preprocessing_mismatch
from tasks.training.engine import Engine, EngineOptions
from tasks.training.loaders import build_loader
from tasks.training.loggers import build_loggers
from tasks.training.model import build_model
from tasks.training.optim import build_optimizer, scheduler_from_config
from tasks.training.precision import resolve_amp
from tasks.training.rng import seed_everything
from tasks.training.run_guard import check_resumable, interrupted_sentence, refuse_existing_checkpoints, run_lock
from tasks.training.scaling import scaled_lr, use_sync_bn
from tasks.training.workers import plan_loader, usable_cores

log = logging.getLogger(__name__)


def build_datasets(cfg: DictConfig):
    if cfg.dataset.get("prepare") is not None:
        if dist.is_main():
            instantiate(cfg.dataset.prepare)
        dist.barrier()
    if cfg.check_data:
        report = check_dataset(cfg.dataset)  # on every rank: a rank that raised alone would hang the others
        for problem in report.warnings[:5]:
            log.warning("dataset check: %s", problem.message)
        report.raise_if_fatal()
    train_set, val_set = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    names = cfg.dataset.get("class_names")
    if names is not None and list(train_set.class_names) != list(names):
        raise ConfigError(f"dataset.class_names={list(names)} is not what dataset.train reads "
                          f"({list(train_set.class_names)[:10]}); set class names with a *_custom dataset "
                          f"(dataset=voc_det_custom, coco_custom or voc_seg_custom), whose splits use them.")
    if train_set.num_classes != cfg.dataset.num_classes:
        raise ConfigError(f"dataset.num_classes={cfg.dataset.num_classes} but the training annotations "
                          f"define {train_set.num_classes} classes; set dataset.num_classes={train_set.num_classes}.")
    return train_set, val_set


def train(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    check_train_config(cfg)
    device = dist.init_from_env()
    if (mismatch := preprocessing_mismatch(cfg)) and dist.is_main():
        log.warning(mismatch)
    run_dir = dist.all_gather_objects(str(run_dir))[0]  # every rank writes (if at all) where rank 0 does
    refuse_existing_checkpoints(run_dir, cfg.resume)
    with run_lock(run_dir) if dist.is_main() else contextlib.nullcontext():
        return _train_in(cfg, run_dir, device)


def _train_in(cfg: DictConfig, run_dir: str, device: torch.device) -> dict[str, float]:
    loading = plan_loader(cfg.num_workers, device.type, cfg.threads, usable_cores(), dist.local_world_size())
    if loading.threads:
        torch.set_num_threads(loading.threads)
    if cfg.num_workers == "auto" and dist.is_main():
        log.info(loading.why)
    memory = apply_cpu_memory(cfg.cpu_memory, device)
    if dist.is_main():
        log.info(memory)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)  # same initial weights on every rank
    train_set, val_set = build_datasets(cfg)

    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    if cfg.init_from and backbone_cfg.get("pretrained"):  # the checkpoint replaces every backbone weight
        log.info("init_from is set: backbone.pretrained=%s is not loaded", backbone_cfg["pretrained"])
        backbone_cfg["pretrained"] = None
    model = build_model(backbone_cfg, cfg.head, cfg.dataset.num_classes)
    if cfg.init_from:
        fresh = load_model_weights(model, load_checkpoint(cfg.init_from), cfg.init_from, cfg.dataset.num_classes,
                                   reinit_head_mismatches=True)
        if fresh and dist.is_main():
            log.info("init_from %s: %d tensors whose shapes no longer fit were re-initialised: %s",
                     cfg.init_from, len(fresh), ", ".join(fresh))
    if use_sync_bn(cfg.sync_bn, cfg.batch_size, dist.world_size(), device.type == "cuda"):
        if cfg.sync_bn == "auto":
            log.info("sync_bn=auto: SyncBatchNorm on (%d images per process over %d processes)",
                     cfg.batch_size, dist.world_size())
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if dist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(model)
    seed_everything(cfg.seed + dist.rank())

    train_loader = build_loader(train_set, cfg.batch_size, True, loading.workers, cfg.seed)
    val_loader = build_loader(val_set, cfg.eval_batch_size, False, loading.workers, cfg.seed)
    lr = scaled_lr(cfg.optim.optimizer.lr, cfg.batch_size, dist.world_size(), cfg.optim.get("reference_batch"))
    if dist.is_main():
        log.info("learning rate %.6g (optim.optimizer.lr=%g for a global batch of %s; this run's is %d x %d)", lr,
                 cfg.optim.optimizer.lr, cfg.optim.get("reference_batch") or "any size", cfg.batch_size,
                 dist.world_size())
    optimizer = build_optimizer(instantiate(cfg.optim.optimizer, lr=lr), model, cfg.optim.weight_decay,
                                cfg.optim.norm_bias_decay)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:  # full batches only: fewer images than one batch would train nothing, silently
        raise ConfigError(f"the train split holds {len(train_set)} images, fewer than one batch of batch_size="
                          f"{cfg.batch_size} per process x {dist.world_size()} processes, so no step would run; "
                          f"expected batch_size={max(1, len(train_set) // dist.world_size())} or smaller, or more "
                          f"training images.")
    scheduler = scheduler_from_config(optimizer, OmegaConf.to_container(cfg.schedule, resolve=True),
                                      cfg.epochs * steps_per_epoch, steps_per_epoch)
    config = OmegaConf.to_container(cfg, resolve=True)
    loggers = build_loggers(cfg.get("logger"), run_dir, config) if dist.is_main() and "logger" in cfg else None

    amp, why = resolve_amp(cfg.amp, device)
    if dist.is_main() and cfg.amp == "auto":
        log.info("%s: training autocasts to %s (evaluation stays fp32)", why, amp or "nothing")
    engine = Engine(model, optimizer, scheduler, train_loader, val_loader, val_set.evaluator, run_dir,
                    EngineOptions(epochs=cfg.epochs, eval_every=cfg.eval_every, clip_grad_norm=cfg.clip_grad_norm,
                                  log_every=cfg.log_every, progress=cfg.progress, amp=amp,
                                  channels_last=cfg.channels_last, compile=cfg.compile, ema_decay=cfg.ema_decay,
                                  checkpoint_every_steps=cfg.checkpoint_every_steps,
                                  check_sync_every=cfg.check_sync_every,
                                  max_bad_samples=cfg.max_bad_samples, report=cfg.report),
                    device, config=config, loggers=loggers, artifact=artifact_of_dataset(cfg, train_set))
    if cfg.resume:
        path = Path(run_dir) / "last.ckpt" if cfg.resume is True else Path(str(cfg.resume))
        if path.exists() or cfg.resume is not True:
            check_resumable(load_checkpoint(path), cfg, path)
            engine.resume(path)
        else:
            log.info("resume=true but %s has no last.ckpt yet: starting from scratch", run_dir)
    try:
        metrics = engine.fit()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_sentence(engine.step, run_dir)) from None
    if dist.is_main():
        if engine.sync_checks:
            log.info("weights identical on all %d ranks at each of %d checks", dist.world_size(), engine.sync_checks)
        _plot_curves(engine.history, Path(run_dir) / "curves.png")
        log.info("checkpoints and logs in %s", run_dir)
    return TrainResult(metrics, primary=engine.primary_metric, best=engine.best_metric)


class TrainResult(dict):
    """The last evaluation's metrics, plus the primary metric's name and its best value over the run
    (what best.ckpt holds, and what a Hydra sweeper optimises)."""

    def __init__(self, metrics: dict[str, float], primary: str | None, best: float | None):
        super().__init__(metrics)
        self.primary = primary
        self.best = best


def _plot_curves(history: list[dict], path: Path) -> None:
    try:
        from tasks.analysis.visualize import plot_history
    except ImportError:  # matplotlib missing: the curves are also in TensorBoard
        return
    plot_history(history, path)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    """Returns the best value of the primary validation metric (AP, mIoU): the objective of a sweep
    (`-m hparams_search=...`)."""
    metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    if dist.is_main() and metrics:
        names = [k for k in metrics if "/" not in k]
        print("final metrics: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in names))
        if metrics.primary is not None and metrics.best is not None:
            print(f"best {metrics.primary}={metrics.best:.4f}")
    return metrics.best


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "train")


if __name__ == "__main__":
    cli()
