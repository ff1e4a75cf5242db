"""benchmarks/processes.py: contenders in spawned children, each under its own cpu_memory setting.

The allocator is checked by its effect, counted by the kernel: a 64-MiB tensor is above glibc's largest mmap
threshold (32 MiB), so with the C library's defaults every allocation maps fresh pages and faults each 4-KiB
page in again; with cpu_memory=reuse the next allocation reuses the freed heap and barely faults.
"""
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.processes import StepProcess, StepProcessError, step_processes  # noqa: E402

PAGES_64_MIB = 64 * 2**20 // 4096
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def probe_steps(tag: str) -> dict:
    """The children's builder: who am I, a 64-MiB allocation, and a step that fails."""
    def fail():
        raise ValueError(f"step of {tag} failed on purpose")

    return {"pid": os.getpid, "threads": torch.get_num_threads, "allocate 64 MiB": lambda: float(torch.ones(
        PAGES_64_MIB * 1024).sum()), "fail": fail}


def broken_builder(tag: str) -> dict:
    raise RuntimeError(f"builder of {tag} cannot build")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_children_hold_their_allocator_and_report_failures_and_leave_no_process():
    system = StepProcess("system", probe_steps, "s", cpu_memory="system", threads=1)
    reuse = StepProcess("reuse", probe_steps, "r", cpu_memory="reuse", threads=1)
    with pytest.raises(StepProcessError) as failed:
        with step_processes(system, reuse):
            pids = {child.label: child.call("pid").value for child in (system, reuse)}
            assert pids == {"system": system.pid, "reuse": reuse.pid} and os.getpid() not in pids.values()
            assert system.call("threads").value == reuse.call("threads").value == 1
            assert system.info.contenders == ("pid", "threads", "allocate 64 MiB", "fail")
            assert not system.info.memory_reuse_applied and reuse.info.memory_reuse_applied == GLIBC
            with pytest.raises(KeyError, match="holds no contender 'nothing'"):
                system.call("nothing")

            allocate = {child.label: [child.call("allocate 64 MiB") for _ in range(4)] for child in (system, reuse)}
            assert all(r.value == PAGES_64_MIB * 1024 for replies in allocate.values() for r in replies)
            # glibc's defaults: fresh pages (nearly all of them faulted in) on every call
            assert all(r.minor_faults > 0.9 * PAGES_64_MIB for r in allocate["system"])
            if GLIBC:
                # reuse: the first call grows the heap. So may the second: torch asks for 64-byte aligned memory,
                # and glibc's memalign needs a free chunk larger than the request, so the chunk of exactly that
                # size freed by the first call fits only once it has coalesced with its neighbour. Then no faults.
                assert allocate["reuse"][0].minor_faults > 0.9 * PAGES_64_MIB
                assert all(r.minor_faults < 0.05 * PAGES_64_MIB for r in allocate["reuse"][2:])

            reuse.call("fail")  # a step that raises ends its child and leaves the block
    message = str(failed.value)
    assert "'reuse'" in message and "cpu_memory=reuse" in message and "running 'fail'" in message
    assert "ValueError: step of r failed on purpose" in message and "in fail" in message
    for child in (system, reuse):
        assert _gone(child.pid)

    # A builder that raises: one error naming the child, what it was doing and the exception, with its traceback.
    broken = StepProcess("broken", broken_builder, "b", cpu_memory="system", threads=1)
    with pytest.raises(StepProcessError) as failed:
        with step_processes(broken):
            pass
    message = str(failed.value)
    assert "'broken'" in message and "building its contenders" in message
    assert "RuntimeError: builder of b cannot build" in message and "in broken_builder" in message
    assert broken.pid is not None and _gone(broken.pid)
