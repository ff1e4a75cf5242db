"""Contenders that run in their own process, called by name from the benchmark's process.

Some settings cannot be compared inside one process: `tasks.cpu_memory.reuse_freed_memory()` changes glibc's
malloc for the whole process and cannot be undone cleanly (it also switches off glibc's dynamic mmap
threshold). So a `StepProcess` is a child started with the multiprocessing *spawn* context (a fresh
interpreter, nothing inherited from the parent's heap) that applies its `cpu_memory` setting first, then
calls `builder(*args)` for a {name: step function} mapping and serves requests over a pipe: a name runs
that step once and replies; None ends the child. Only one process computes at a time (the parent waits on
the reply), so `timing.interleaved` keeps its rotating rounds and per-round pairs across processes.

A failure in a child (building or stepping) comes back to the parent as one `StepProcessError` that names the
child, what it was doing and the exception, with the child's traceback text; the children are always
stopped and reaped (`step_processes` closes them on the way out, also when an exception passes through).
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tasks.cpu_memory import CHOICES, reuse_freed_memory

JOIN_TIMEOUT_S = 10.0


class StepProcessError(RuntimeError):
    """A benchmark child process failed; the message holds its traceback."""


@dataclass(frozen=True)
class StepReply:
    value: Any  # what the step returned (pickled back)
    minor_faults: int  # page faults of the child during the step (getrusage ru_minflt delta)
    child_ms: float  # the step's time on the child's own clock


@dataclass(frozen=True)
class ChildInfo:
    label: str
    pid: int
    cpu_memory: str  # the setting asked for: reuse | system
    memory_reuse_applied: bool  # whether glibc accepted it
    allocator: str  # one phrase: what the child's malloc does
    threads: int
    contenders: tuple[str, ...]


def _serve(connection, builder: Callable[..., Mapping[str, Callable[[], object]]], args: tuple, label: str,
           cpu_memory: str, threads: int) -> None:
    """The child's whole life: process setting, build, then one step per request until None."""
    doing = "building its contenders"
    try:
        if cpu_memory == "reuse":  # before anything is built, so that every tensor comes from the tuned malloc
            applied, allocator = reuse_freed_memory()
        else:
            applied, allocator = False, "the C library's default allocation (glibc: large blocks mmapped afresh)"
        torch.set_num_threads(threads)
        steps = dict(builder(*args))
        # As timing.interleaved does in its rounds: no collection inside a timed call. A collection between
        # calls would land in the next one's time here (the parent's clock runs from request to reply), so the
        # collector stays off for the child's few steps; reference counting still frees every tensor.
        gc.collect()
        gc.disable()
        connection.send(("ready", ChildInfo(label, os.getpid(), cpu_memory, applied, allocator,
                                            torch.get_num_threads(), tuple(steps))))
        while (name := connection.recv()) is not None:
            doing = f"running {name!r}"
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            value = steps[name]()
            elapsed = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            connection.send(("ok", StepReply(value, faults, elapsed * 1e3)))
            del value
    except BaseException as error:  # KeyboardInterrupt too: the parent must hear why the child stops
        try:
            connection.send(("error", (doing, f"{type(error).__name__}: {error}", traceback.format_exc())))
        except (OSError, ValueError):
            pass  # the parent is gone
    finally:
        connection.close()


class StepProcess:
    """A child process that holds the step functions `builder(*args)` returns, under a `cpu_memory` setting."""

    def __init__(self, label: str, builder: Callable[..., Mapping[str, Callable[[], object]]], *args: Any,
                 cpu_memory: str = "system", threads: int | None = None):
        if cpu_memory not in CHOICES:
            raise ValueError(f"cpu_memory={cpu_memory!r} is not allowed; expected one of {', '.join(CHOICES)}.")
        self.label, self.cpu_memory = label, cpu_memory
        self.threads = torch.get_num_threads() if threads is None else threads
        self.info: ChildInfo | None = None
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_serve, name=f"bench-{label}", daemon=True,
                                        args=(child_end, builder, args, label, cpu_memory, self.threads))
        self._child_end = child_end

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> None:
        self._process.start()
        self._child_end.close()  # the parent's copy: once the child exits, recv sees EOF instead of hanging

    def wait_ready(self) -> ChildInfo:
        self.info = self._receive("building its contenders")
        return self.info

    def call(self, name: str) -> StepReply:
        """Run the step `name` once in the child; the parent blocks until it replies."""
        if self.info is None:
            raise RuntimeError(f"child process {self.label!r} is not ready; call start() and wait_ready() first.")
        if name not in self.info.contenders:
            raise KeyError(f"child process {self.label!r} holds no contender {name!r}; "
                           f"it holds {', '.join(self.info.contenders)}.")
        self._connection.send(name)
        return self._receive(f"running {name!r}")

    def caller(self, name: str, replies: list[StepReply] | None = None) -> Callable[[], StepReply]:
        """A no-argument function for `timing.interleaved` that calls `name`, appending each reply to `replies`."""
        def call() -> StepReply:
            reply = self.call(name)
            if replies is not None:
                replies.append(reply)
            return reply
        return call

    def _receive(self, doing: str):
        try:
            kind, payload = self._connection.recv()
        except (EOFError, OSError):
            self._process.join(JOIN_TIMEOUT_S)
            raise StepProcessError(f"benchmark child process {self.label!r} (pid {self.pid}) ended while {doing} "
                                   f"without a reply (exit code {self._process.exitcode}).") from None
        if kind == "error":
            child_doing, error, child_traceback = payload
            self.close()
            raise StepProcessError(f"benchmark child process {self.label!r} (pid {self.pid}, cpu_memory="
                                   f"{self.cpu_memory}) failed while {child_doing}: {error}\n"
                                   f"--- the child's traceback ---\n{child_traceback.rstrip()}")
        return payload

    def close(self) -> None:
        """Ask the child to end, and make sure it has ended (terminated, then killed, if it does not)."""
        if self._process.pid is None:  # never started
            return
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except (OSError, ValueError):
                pass
            self._process.join(JOIN_TIMEOUT_S)
        for stop in (self._process.terminate, self._process.kill):
            if not self._process.is_alive():
                break
            stop()
            self._process.join(JOIN_TIMEOUT_S)
        self._process.join()
        self._connection.close()


@contextmanager
def step_processes(*processes: StepProcess) -> Iterator[tuple[StepProcess, ...]]:
    """Start the children together (they build at the same time), wait until each is ready, close all at the end."""
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.close()


__all__ = ["ChildInfo", "StepProcess", "StepProcessError", "StepReply", "step_processes"]
