"""How many DataLoader worker processes and compute threads a training run uses (`num_workers=auto`).

On a GPU the step needs the CPU only to feed it, so workers are what the cores are for. On a CPU the step
itself needs every core: a worker process takes one away, and while it runs on a core that one of the
step's threads also wants, every parallel op waits for the preempted thread. Measured on 2 cores
(SSDLite fine-tuning, batch 16, bf16): 6.8 images/s with 2 workers, 9.0 with the loading done in the
training process between steps. Loading one photo (decode + SSD augmentation) costs about a fifteenth of
its training step's CPU time, so on a CPU one worker per 8 cores keeps up, on cores the step no longer uses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

CORES_PER_WORKER_ON_CPU = 8  # loading ~1/15 of a step's CPU time: one worker per 8 compute cores keeps up
MAX_WORKERS_ON_GPU = 8


@dataclass(frozen=True)
class LoaderPlan:
    workers: int
    threads: int | None  # torch.set_num_threads; None keeps PyTorch's default
    why: str


def usable_cores() -> int:
    """The cores this process may run on (taskset / cgroup affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_loader(num_workers: int | str, device_type: str, threads: int | None, cores: int,
                processes: int = 1) -> LoaderPlan:
    """Workers and threads for `num_workers` (an integer, or "auto") on `device_type` ("cpu", "cuda", ...),
    with `cores` usable cores shared by `processes` training processes on this machine."""
    if num_workers != "auto":
        return LoaderPlan(int(num_workers), threads, f"num_workers={num_workers}")
    share = max(1, cores // max(1, processes))
    if device_type != "cpu":
        workers = min(MAX_WORKERS_ON_GPU, max(1, share - 1))
        return LoaderPlan(workers, threads, f"num_workers=auto: {workers} loader workers ({share} cores per "
                                            f"process, {device_type} training: the cores feed the device)")
    workers = share // CORES_PER_WORKER_ON_CPU
    if threads is None and workers and processes == 1:
        threads = share - workers
    where = "in the training process between steps" if workers == 0 else f"in {workers} worker processes"
    return LoaderPlan(workers, threads, f"num_workers=auto: loading {where}, training in "
                                        f"{threads or 'PyTorch default'} threads ({share} cores per process, CPU "
                                        f"training: a worker sharing a core with the step stalls it)")
