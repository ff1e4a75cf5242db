"""Interleaved wall-clock timing: every contender runs once per round, in a rotating order.

Timing A for a minute and then B for a minute lets a neighbour's job land on one side only. Here
each round runs every function once (round r starts at function r mod n, so each one takes each
position equally often), which spreads machine noise over all of them. Samples of the same round
are paired, so a ratio is the median of per-round ratios: a slow round slows both sides of it.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    """Median and quartiles (inclusive method, as numpy's default percentile) of a set of samples.

    `min` is kept too: on a busy machine it is the least disturbed sample.
    """

    median: float
    q1: float
    q3: float
    n: int
    min: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "iqr": self.iqr}


def summarise(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("summarise got no samples; run at least one repeat.")
    values = [float(s) for s in samples]
    if len(values) == 1:
        return Summary(values[0], values[0], values[0], 1, values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(median, q1, q3, len(values), min(values))


def interleaved(functions: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds per call of each function, `repeats` rounds after `warmup` untimed rounds.

    The result of each call is dropped before the next one starts, outside the timed region. The
    garbage collector is paused during the rounds (reference counting still frees tensors) so that a
    collection does not land inside one contender's call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
    names = list(functions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(warmup + repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = clock()
                result = functions[name]()
                elapsed = clock() - start
                del result
                if round_index >= warmup:
                    samples[name].append(elapsed * 1e3)
            if round_index % 8 == 7:
                gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    return samples


def paired_ratio(ours: Sequence[float], peer: Sequence[float]) -> Summary:
    """Median and quartiles of ours[i] / peer[i] over the rounds (< 1: ours is faster)."""
    if len(ours) != len(peer):
        raise ValueError(f"paired_ratio needs as many samples on each side, got {len(ours)} and {len(peer)}.")
    return summarise([a / b for a, b in zip(ours, peer)])


def result_row(task: str, model: str, role: str, measure: str, complexity, samples: Sequence[float]) -> dict:
    """One line of the results: who, what was timed, its size (tasks.analysis.complexity) and its times."""
    return {"task": task, "model": model, "role": role, "measure": measure, "params": complexity.params,
            "madds": complexity.madds, "time_ms": summarise(samples).as_dict(), "samples_ms": list(samples),
            "ratio": None}


__all__ = ["Summary", "summarise", "interleaved", "paired_ratio", "result_row"]
