"""Start-up checks: a config that cannot work stops before any work, with one sentence.

They check the contracts of docs/ARCHITECTURE.md, not this project's class names: a knob is checked
when the config has it (a plug-in backbone without width_mult passes), and the types of the top-level
knobs are checked earlier, at composition (tasks/training/schema.py).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from backbones.base import OUTPUT_STRIDES
from tasks.cpu_memory import check_cpu_memory
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
    if "width_mult" in backbone and (not _is_number(backbone.width_mult) or backbone.width_mult <= 0):
        raise ConfigError(f"backbone.width_mult={backbone.width_mult} is not allowed; expected a number > 0 "
                          f"(the paper's alpha: 1.0, 0.75, 0.5, 0.25, or 1.4 for V2).")
    if "output_stride" in backbone and backbone.output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"backbone.output_stride={backbone.output_stride} is not allowed; expected one of "
                          f"{', '.join(map(str, OUTPUT_STRIDES))}.")


def check_train_config(cfg: DictConfig) -> None:
    check_model_config(cfg)
    head_task, data_task = cfg.head.get("task"), cfg.dataset.get("task")
    for group, task in (("head", head_task), ("dataset", data_task)):
        if task not in TASK_DATASETS:
            raise ConfigError(f"{group}.task={task} in {group}={_choice(group)} is not allowed; expected "
                              f"{' or '.join(TASK_DATASETS)} (every head and dataset config states its task).")
    if head_task != data_task:
        head, data = _choice("head"), _choice("dataset")
        raise ConfigError(
            f"head={head} needs {head_task} annotations but dataset={data} provides {data_task} ones; "
            f"pair head={head} with a {head_task} dataset ({TASK_DATASETS.get(head_task, '?')}).")
    for key in ("epochs", "batch_size", "eval_batch_size"):  # integers already (the schema)
        if cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]} is not allowed; expected a positive integer.")
    workers = cfg.num_workers
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ConfigError(f"num_workers={workers} is not allowed; expected an integer >= 0 (DataLoader worker "
                          f"processes) or auto (tasks/training/workers.py: none on a CPU of fewer than 8 "
                          f"cores, where they would slow the step).")
    check_cpu_memory(cfg.cpu_memory)
    for key in ("max_bad_samples", "checkpoint_every_steps"):
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} is not allowed; expected an integer >= 0.")
    lr = OmegaConf.select(cfg, "optim.optimizer.lr")
    if lr is not None and (not _is_number(lr) or lr <= 0):
        raise ConfigError(f"optim.optimizer.lr={lr} is not allowed; expected a number > 0.")
    input_size = cfg.dataset.get("input_size")
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 32:
        raise ConfigError(f"dataset.input_size={input_size} cannot be taken by the model; expected a "
                          f"whole number of pixels >= 32 (the backbones reduce the input 32-fold).")
    root = cfg.dataset.get("root")
    if cfg.dataset.get("prepare") is None and root is not None and not Path(str(root)).exists():
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
