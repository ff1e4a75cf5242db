"""The few facts about torch.distributed the engine needs; torchrun sets the environment."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_world_size() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank 0's buffers (BN running statistics drift apart: each rank updates them from
    its own batches after DDP's last broadcast), so all ranks evaluate the model rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
