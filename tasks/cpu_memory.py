"""`cpu_memory=reuse`: keep freed tensor memory in the process, so that CPU steps stop page-faulting.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block above its mmap threshold
(32 MiB at most) with a fresh mmap and unmaps it when it is freed. A training step's large activations
(one 96x160x160 map of SSDLite-MobileNetV2 at batch 16 is 157 MiB) therefore arrive as new pages every
step, and the kernel faults in and zeroes each 4-KiB page again. Measured on 2 cores (SSDLite, batch 16,
320, channels_last, fp32): 0.6-0.76 million page faults and 1.2-1.6 s of system time in a 2.3-s step.

With mmap off for malloc and the heap's free top kept (up to 2 GiB), later steps reuse the memory earlier
ones freed: after the first few steps no faults, and the same step takes 1.4 s. (Not from the first: torch
allocates with posix_memalign, and a freed block of exactly the requested size cannot serve the same
request until it has merged with a neighbour, so the heap grows for a few steps.) This is what the jemalloc /
tcmalloc preloads that Intel's PyTorch CPU tuning guide recommends do, done without a preload.

The costs: the process keeps its peak memory until it exits (+7-15% peak in the fine-tuning recipes), and
memory handed out is no longer fresh zero pages, which once hid an op reading memory it never wrote (see
backbones/layers.py, Fp32DepthwiseConv2d; tests/test_cpu_memory.py checks every model family's gradients).
The gain depends on the step: 0.6-0.7x in fp32 (the default), ~0.9x for the bf16 fine-tuning recipes, whose
activations are half the size. `cpu_memory=system` leaves the C library's defaults.
"""
from __future__ import annotations

import ctypes
import platform

import torch

from tasks.errors import ConfigError

CHOICES = ("reuse", "system")
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: a free block at the top of the heap goes back to the system only above 2 GiB
KEEP_FREE_TOP_UP_TO = 2**31 - 1


def reuse_freed_memory() -> tuple[bool, str]:
    """Make glibc's malloc keep freed memory for reuse in this process (and the processes it forks later).

    Returns (applied, one phrase saying what happened or why not).
    """
    if platform.system() != "Linux":
        return False, f"left to the system allocator (tuning is for Linux's glibc, this is {platform.system()})"
    libc_name = platform.libc_ver()[0]
    if libc_name != "glibc":
        uses = libc_name or "another C library"
        return False, f"left to the system allocator (tuning is for glibc, this Python uses {uses})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False, "left to the system allocator (glibc's mallopt could not be found)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_TOP_UP_TO) != 1:
        return False, "left to the system allocator (glibc refused the mallopt settings)"
    return True, "freed tensor memory is kept for the next step (glibc malloc without mmap), so steps do not page-fault"


def check_cpu_memory(mode: object) -> None:
    if mode not in CHOICES:
        raise ConfigError(f"cpu_memory={mode} is not allowed; expected reuse (freed tensor memory stays in the "
                          f"process, so CPU steps do not page-fault) or system (the C library's default).")


def apply_cpu_memory(mode: str, device: torch.device) -> str:
    """Apply `cpu_memory` (reuse | system) for a run on `device`; returns the line to log."""
    check_cpu_memory(mode)
    if mode == "system":
        return "cpu_memory=system: the C library's default allocation"
    if device.type != "cpu":
        return f"cpu_memory=reuse: not applied, the step runs on {device.type} (its tensors are not malloc's)"
    return f"cpu_memory=reuse: {reuse_freed_memory()[1]}"


__all__ = ["CHOICES", "KEEP_FREE_TOP_UP_TO", "apply_cpu_memory", "check_cpu_memory", "reuse_freed_memory"]
