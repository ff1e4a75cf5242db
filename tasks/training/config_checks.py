"""Start-up checks: a config that cannot work stops before any work, with one sentence."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from backbones.base import OUTPUT_STRIDES
from tasks.errors import ConfigError

TASK_DATASETS = {"detection": "coco, voc_det, shapes_det", "segmentation": "voc_seg, shapes_seg"}


def _choice(group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().runtime.choices.get(group, group))
    except ValueError:  # not running under @hydra.main (e.g. compose in tests)
        return group


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model_config(cfg: DictConfig) -> None:
    backbone = cfg.backbone
    if not _is_number(backbone.width_mult) or backbone.width_mult <= 0:
        raise ConfigError(f"backbone.width_mult={backbone.width_mult} is not allowed; expected a number > 0 "
                          f"(the paper's alpha: 1.0, 0.75, 0.5, 0.25, or 1.4 for V2).")
    if backbone.output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"backbone.output_stride={backbone.output_stride} is not allowed; expected one of "
                          f"{', '.join(map(str, OUTPUT_STRIDES))}.")


def check_train_config(cfg: DictConfig) -> None:
    check_model_config(cfg)
    head_task, data_task = cfg.head.get("task"), cfg.dataset.get("task")
    if head_task != data_task:
        head, data = _choice("head"), _choice("dataset")
        raise ConfigError(
            f"head={head} needs {head_task} annotations but dataset={data} provides {data_task} ones; "
            f"pair head={head} with a {head_task} dataset ({TASK_DATASETS.get(head_task, '?')}).")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]} is not allowed; expected a positive integer.")
    for key in ("num_workers", "max_bad_samples", "checkpoint_every_steps"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} is not allowed; expected an integer >= 0.")
    if not _is_number(cfg.optim.optimizer.lr) or cfg.optim.optimizer.lr <= 0:
        raise ConfigError(f"optim.optimizer.lr={cfg.optim.optimizer.lr} is not allowed; expected a number > 0.")
    if not isinstance(cfg.dataset.input_size, int) or cfg.dataset.input_size < 32:
        raise ConfigError(f"dataset.input_size={cfg.dataset.input_size} cannot be taken by the model; expected a "
                          f"whole number of pixels >= 32 (the backbones reduce the input 32-fold).")
    if cfg.dataset.get("prepare") is None and not Path(str(cfg.dataset.root)).exists():
        raise ConfigError(f"dataset.root={cfg.dataset.root} does not exist; expected the folder of the "
                          f"{_choice('dataset')} dataset (set dataset.root=/path/to/it).")


def preprocessing_mismatch(cfg: DictConfig) -> str | None:
    """One sentence when the dataset transforms normalise differently from what the backbone weights
    expect (a user's override of dataset.*.transforms.mean/std); None when they agree."""
    expected = {"mean": cfg.backbone.get("mean"), "std": cfg.backbone.get("std")}
    if expected["mean"] is None or expected["std"] is None:
        return None
    for split in ("train", "val"):
        transforms = (cfg.dataset.get(split) or {}).get("transforms") or {}
        for key, value in expected.items():
            found = transforms.get(key)
            if found is not None and [round(float(v), 6) for v in found] != [round(float(v), 6) for v in value]:
                return (f"dataset.{split}.transforms.{key}={list(found)} differs from the {key} "
                        f"{list(value)} that backbone.pretrained={cfg.backbone.get('pretrained')} expects, so the "
                        f"weights see inputs they were not trained on; remove the override unless that is intended.")
    return None
