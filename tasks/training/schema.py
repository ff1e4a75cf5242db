"""The types of conf/train.yaml's top-level knobs, checked by Hydra at composition.

`register()` stores the schema in Hydra's ConfigStore as `schema/train` (train.yaml's first default), so
`epochs=abc` or `amp=[1]` fails while the command line is composed, naming the key. Values (ranges,
combinations) stay with tasks/training/config_checks.py. The groups (backbone, head, ...) are open:
their own configs define them. Keys this schema does not list still merge (the node is not struct), so
a new knob in train.yaml needs no change here to work, only to be typed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class TrainSchema:
    seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 32
    num_workers: Any = "auto"         # an integer >= 0, or "auto" (tasks/training/workers.py)
    eval_every: int = 1
    clip_grad_norm: float | None = None
    amp: str | None = None
    channels_last: bool = True
    compile: bool = False
    ema_decay: float | None = None
    sync_bn: Any = "auto"             # true, false or "auto" (on when the per-process batch is small)
    checkpoint_every_steps: int = 0
    check_sync_every: int = 0
    check_data: bool = True
    max_bad_samples: int = 10
    report: bool = True
    deterministic: bool = False
    log_every: int = 20
    progress: bool = True
    resume: Any = False            # true, or the path of a checkpoint
    init_from: str | None = None
    threads: int | None = None
    cpu_memory: str = "reuse"       # reuse | system (tasks/cpu_memory.py)
    backbone: Any = None
    head: Any = None
    dataset: Any = None
    optim: Any = None
    schedule: Any = None
    logger: Any = None


def register() -> None:
    node = OmegaConf.structured(TrainSchema)
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(group="schema", name="train", node=node, package="_global_", provider="mobilevision")
