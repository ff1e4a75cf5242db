"""A training run never overwrites what it did not create: a run directory that holds checkpoints needs
resume, one run at a time holds a directory (a lock), a resumed run must be the same model and optimizer,
and Ctrl-C ends with one sentence saying what is kept."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.errors import ConfigError

CHECKPOINT_NAMES = ("last.ckpt", "best.ckpt")
LOCK_NAME = ".train.lock"
# What a resumed run must share with the checkpoint (its weights and optimizer state only fit these).
RESUME_MUST_MATCH = ("backbone", "head", "optim.optimizer._target_", "dataset.num_classes")
RESUME_IGNORED = ("pretrained",)  # the checkpoint's weights replace these anyway


def refuse_existing_checkpoints(run_dir: str | Path, resume: Any) -> None:
    if resume:
        return
    found = [name for name in CHECKPOINT_NAMES if (Path(run_dir) / name).exists()]
    if found:
        raise ConfigError(f"run directory {run_dir} already holds {' and '.join(found)} from an earlier run; "
                          f"continue that run with resume=true, or choose another directory with "
                          f"hydra.run.dir=<new folder>.")


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory for the whole run (released when the process ends,
    however it ends); a second run in the same directory is refused."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"run directory {run_dir} is in use by another training run ({holder}); wait "
                              f"for it to finish, or choose another directory with hydra.run.dir=<new folder>."
                              ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if k in RESUME_IGNORED:
                continue
            found = _first_difference(old.get(k), new.get(k), f"{key}.{k}")
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


def _select(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_resumable(state: dict[str, Any], cfg: DictConfig, path: str | Path) -> None:
    """The checkpoint at `path` can be continued by this run: same backbone, head, optimizer and classes,
    and epochs left to train."""
    if "optimizer" not in state:
        raise ConfigError(f"resume={path} is an inference-only checkpoint (it has no optimizer state); start a new "
                          f"run from its weights with init_from={path}.")
    saved = state.get("config") or {}
    current = OmegaConf.to_container(cfg, resolve=True)
    for dotted in RESUME_MUST_MATCH:
        found = _first_difference(_select(saved, dotted), _select(current, dotted), dotted)
        if found:
            key, old, new = found
            raise ConfigError(f"resume={path} was trained with {key}={old} but this run has {key}={new}; resume "
                              f"with the checkpoint's settings, or start a new run that takes its weights with "
                              f"init_from={path}.")
    done = int(state.get("epoch", 0))
    if done >= int(cfg.epochs) and not state.get("batch_in_epoch"):
        raise ConfigError(f"resume={path} has already finished its {done} epochs (epochs={cfg.epochs}); to train "
                          f"on, resume with a larger epochs=, or start a new run with init_from={path}.")


def interrupted_sentence(step: int, run_dir: str | Path) -> str:
    last = Path(run_dir) / "last.ckpt"
    if last.exists():
        return (f"interrupted at step {step}; {last} is kept (the last completed checkpoint); continue with "
                f"resume=true hydra.run.dir={run_dir}.")
    return f"interrupted at step {step}, before any checkpoint was written; nothing to resume, start the run again."
