"""Build any composed model in one call, from the same config names the command line uses."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn


def _flow(value: Any) -> str:
    """A Python value in Hydra's override grammar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _override(key: str, value: Any) -> str:
    return f"{key.replace('__', '.')}={_flow(value)}"


def compose_config(config_name: str = "train", overrides: Sequence[str] = (),
                   config_dirs: Sequence[str | Path] = ()) -> Any:
    """The config `python -m tasks.<config_name> <overrides>` would run with; `config_dirs` are the user's
    own config folders (what --config-dir / hydra.searchpath add on the command line)."""
    from hydra import compose, initialize_config_dir

    from tasks.cli import CONFIG_DIR

    uris = ",".join(Path(d).resolve().as_uri() for d in config_dirs)
    extra = [f"hydra.searchpath=[{uris}]"] if config_dirs else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=[*extra, *overrides])


def build_model(backbone: str = "mobilenet_v2", head: str | None = "ssdlite", num_classes: int | None = None,
                *, overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = (), **options: Any) -> nn.Module:
    """A model from config names: `build_model("mobilenet_v2", "ssdlite", num_classes=3, backbone__width_mult=0.5)`.

    `backbone` and `head` are options of conf/backbone and conf/head (or of the user's `config_dirs`);
    `head=None` puts the papers' ImageNet classifier on the backbone. Keyword options are config keys with
    `__` for the dots (`head__score_threshold=0.3`); `overrides` takes command-line spellings as they are.
    `num_classes` counts object classes for detection, classes with background for segmentation; None
    keeps the default dataset's count (shapes: 3) or 1000 for a classifier. The weights are fresh (or the
    backbone's `pretrained` source), in train mode.
    """
    from tasks.training.model import build_model as build

    pairs = [f"backbone={backbone}", *([f"head={head}"] if head else []),
             *(_override(k, v) for k, v in options.items()), *overrides]
    cfg = compose_config("train", pairs, config_dirs)
    if head is None:
        return build(cfg.backbone, None, num_classes or 1000)
    return build(cfg.backbone, cfg.head, num_classes if num_classes is not None else int(cfg.dataset.num_classes))
