"""A trained run as the other entry points see it: the model and the config its checkpoint carries.

The checkpoint is someone else's file: its config is checked by tasks.resolve (only this project's own
builders, plus `trusted` module prefixes) before anything is built, the backbone is built without
pretrained weights (the checkpoint's weights replace them; nothing is downloaded or read), and what the
model needs at use time (class names, category ids, mean/std, decoding) comes from `state["artifact"]`,
never from the dataset.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks.resolve import check_file_config
from tasks.training.artifact import artifact_without_dataset
from tasks.training.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from tasks.training.model import build_model

# Where a callable lived when older checkpoints were written (their configs name it).
MOVED_TARGETS = {"tasks.synthetic.ensure_shapes": "tasks.datasets.shapes.ensure_shapes"}
# The parts of a training config that entry points build objects from.
BUILT_SECTIONS = ("backbone", "head", "dataset")


def load_trained_model(checkpoint: str | Path, dataset_root: str | None = None,
                       trusted: Sequence[str] = ()) -> tuple[nn.Module, DictConfig]:
    """The model of a tasks.train checkpoint, in eval mode, and the training config it carries
    (with the dataset moved to `dataset_root` when given, and the artifact as `cfg.artifact`)."""
    state = load_checkpoint(checkpoint)
    if not state.get("config"):
        raise CheckpointError(f"checkpoint {checkpoint} carries no training config; expected one written by "
                              f"tasks.train.")
    config = file_config(state, checkpoint)
    for section in BUILT_SECTIONS:
        check_file_config(config[section], f"checkpoint {checkpoint}", trusted, path=section)
    cfg = OmegaConf.create(config)
    if dataset_root is not None:
        cfg = rebase_dataset_root(cfg, dataset_root)
    cfg.artifact = state.get("artifact") or artifact_without_dataset(config, f"checkpoint {checkpoint}")
    model = build_model(cfg.backbone, cfg.head, cfg.dataset.num_classes)
    load_model_weights(model, state, checkpoint)
    return model.eval(), cfg


def file_config(state: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's training config as plain data, targets moved, the backbone's `pretrained` cleared (the
    checkpoint's weights replace them: loading never downloads or reads backbone weights)."""
    config = _with_moved_targets(state["config"])
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in BUILT_SECTIONS):
        raise CheckpointError(f"checkpoint {checkpoint} has a config without {', '.join(BUILT_SECTIONS)} "
                              f"sections; expected the config tasks.train writes.")
    config["backbone"] = {**config["backbone"], "pretrained": None}
    return config


def rebase_dataset_root(cfg: DictConfig, root: str) -> DictConfig:
    """The checkpoint's config is resolved (paths are spelled out), so moving the dataset means
    rewriting every path under dataset.* that starts with the old root."""
    old = str(cfg.dataset.root)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)

    def move(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: move(v) for k, v in node.items()}
        if isinstance(node, list):
            return [move(v) for v in node]
        if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
            return str(root) + node[len(old):]
        return node

    cfg = cfg.copy()
    cfg.dataset = OmegaConf.create(move(dataset))
    return cfg


def _with_moved_targets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: MOVED_TARGETS.get(v, v) if k == "_target_" else _with_moved_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_moved_targets(v) for v in node]
    return node
