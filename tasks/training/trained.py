"""A trained run as the other entry points see it: the model and the config its checkpoint carries."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from tasks.training.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from tasks.training.model import build_model

# Where a callable lived when older checkpoints were written (their configs name it).
MOVED_TARGETS = {"tasks.synthetic.ensure_shapes": "tasks.datasets.shapes.ensure_shapes"}


def load_trained_model(checkpoint: str | Path, dataset_root: str | None = None) -> tuple[nn.Module, DictConfig]:
    """The model of a tasks.train checkpoint, in eval mode, and the training config it carries
    (with the dataset moved to `dataset_root` when given)."""
    state = load_checkpoint(checkpoint)
    if not state.get("config"):
        raise CheckpointError(f"checkpoint {checkpoint} carries no training config; expected one written by "
                              f"tasks.train.")
    cfg = OmegaConf.create(_with_moved_targets(state["config"]))
    if dataset_root is not None:
        cfg = rebase_dataset_root(cfg, dataset_root)
    backbone = {**OmegaConf.to_container(cfg.backbone, resolve=True), "pretrained": None}  # the checkpoint
    model = build_model(backbone, cfg.head, cfg.dataset.num_classes)  # holds every weight: nothing to download
    load_model_weights(model, state, checkpoint)
    return model.eval(), cfg


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
