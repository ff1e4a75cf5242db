"""Building objects from config nodes (Hydra's `instantiate`) with a user's error kept as itself.

A config that came from a FILE (a checkpoint, an ONNX sidecar) is data, not code: `instantiate_from_file`
checks every `_target_` in it (nested dicts, lists, `_args_`, `_partial_` nodes alike) against this
project's own builders before anything is imported or called, and refuses any other with one sentence.
"""
from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Sequence
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tasks.errors import ConfigError

# What a file's config may name: this project's backbones, heads, dataset loaders, transforms and the
# shapes writer, and PyTorch's optimizers. A target must start with one of these (then a '.' or nothing),
# and the object it resolves to must be defined under one of them too (so `backbones.os.system`, reached
# through a module that imported os, is refused as well).
PROJECT_TARGETS = (
    "backbones",
    "heads",
    "torch.optim",
    "tasks.detection.coco.CocoDetection",
    "tasks.detection.voc.VOCDetection",
    "tasks.detection.transforms",
    "tasks.segmentation.voc.VOCSegmentation",
    "tasks.segmentation.coco_masks.CocoVOCSegmentation",
    "tasks.segmentation.transforms",
    "tasks.datasets.shapes.ensure_shapes",
)
DENIED_TARGETS = ("backbones.weights",)  # downloads or reads weight files: never on a file's say-so


def instantiate_node(node: Any) -> Any:
    """hydra's instantiate, but a loader's own error (a missing file, a bad value) comes out as itself
    rather than wrapped in hydra's InstantiationException, so user_errors_exit can report it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it loads
            return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, OSError)):
            raise err.__cause__ from None
        raise


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes if p)


def _targets(node: Any, path: str) -> list[tuple[str, Any, dict]]:
    """Every (key path, value, node holding it) of a `_target_` key anywhere in a plain dict/list tree."""
    found: list[tuple[str, Any, dict]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                found.append((where, value, node))
            else:
                found += _targets(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _targets(value, f"{path}[{i}]")
    return found


def _defined_under(target: str, prefixes: Sequence[str]) -> bool:
    """Import the (already allowed) target and check it is a class or function defined under `prefixes`."""
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except Exception:  # noqa: BLE001 - not importable: hydra would fail on it anyway; refuse here
        return False
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return False
    return _under(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}", prefixes)


def check_file_config(node: Any, source: str, trusted: Sequence[str] = (), path: str = "") -> None:
    """Raise ConfigError naming the first `_target_` in `node` that is not this project's own nor under
    one of the `trusted` module prefixes; `source` names the file (e.g. "checkpoint run/last.ckpt")."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    allowed = (*PROJECT_TARGETS, *(str(t) for t in trusted))
    for key, target, holder in _targets(node, path):
        parts = target.split(".") if isinstance(target, str) else []
        ok = (len(parts) > 1 and not any(p.startswith("_") or not p.isidentifier() for p in parts)
              and _under(target, allowed) and not _under(target, DENIED_TARGETS) and _defined_under(target, allowed))
        if not ok:
            raise ConfigError(f"{source} asks to build {key}={target!r}, which is not one of this project's "
                              f"own classes or functions (backbones, heads, dataset loaders and transforms, "
                              f"torch.optim); refused before anything ran (if you trust it, add its module "
                              f"with trusted_targets=[...]).")
        if holder.get("pretrained"):
            raise ConfigError(f"{source} asks to build {key}={target!r} with pretrained={holder['pretrained']!r}, "
                              f"which would download or read weight files; a file's config never loads weights "
                              f"(expected pretrained: null there).")


def instantiate_from_file(node: Any, source: str, trusted: Sequence[str] = ()) -> Any:
    """instantiate_node for a config read from a file: every `_target_` is checked first."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    check_file_config(node, source, trusted)
    return instantiate_node(node)
