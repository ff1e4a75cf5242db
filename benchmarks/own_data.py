"""What the own-data recipe comparisons (finetune.py: detection, finetune_seg.py: segmentation) share:
our recipe run as a user runs it, where its time went, and the ratios against issue 11's bar."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_COCO = ROOT.parent / "shared" / "data" / "coco128"
BAR = "(bar: >= 1.25x the metric in <= 0.75x the time)"

_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^]]*\]\[\w+\] - (.*)$")
# What a tasks.train log line marks the end of; the interval before it is booked under that name.
_PHASES = (("train", re.compile(r"^epoch \d+: ")), ("evaluate", re.compile(r"^epoch \d+ val: ")),
           ("report", re.compile(r"^evaluation report: ")))


def train_with_tasks(experiment: str, root: Path, epochs: int, run_dir: Path, threads: int,
                     overrides: Sequence[str]) -> dict[str, Any]:
    """`python -m tasks.train experiment=<experiment> dataset.root=<root> ...` in a subprocess, timed from
    launch to exit; returns seconds, the command, its last.ckpt and where the time went (`time_split`)."""
    command = [sys.executable, "-m", "tasks.train", f"experiment={experiment}", f"dataset.root={root}",
               f"epochs={epochs}", f"threads={threads}", "progress=false", f"hydra.run.dir={run_dir}", *overrides]
    launched = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"our training failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    log = run_dir / "train.log"
    split = time_split(log.read_text(), launched, launched + seconds) if log.is_file() else {}
    return {"seconds": seconds, "command": " ".join(command[1:]), "checkpoint": next(run_dir.rglob("last.ckpt")),
            "time_split": split}


def time_split(log_text: str, launched: float, ended: float) -> dict[str, float]:
    """Seconds of a tasks.train run by phase, from its log's timestamps: `startup` (launch to the last line
    before the first epoch ends: config, data checks, model), `train` (epochs, from the previous event to each
    "epoch N:" line, DataLoader start-up included), `evaluate` (to each "epoch N val:"), `report` (to each
    "evaluation report:") and `finish` (the last event to exit: final checkpoint, plots). The phases add up
    to the run's time; log timestamps have millisecond resolution."""
    events = []
    for line in log_text.splitlines():
        if match := _LOG_LINE.match(line):
            stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((stamp, next((name for name, pattern in _PHASES if pattern.match(match[2])), None)))
    split = dict.fromkeys(("startup", "train", "evaluate", "report", "finish"), 0.0)
    first_epoch = next((i for i, (_, phase) in enumerate(events) if phase == "train"), None)
    if first_epoch is None:
        split["startup"] = ended - launched
        return split
    last = events[first_epoch - 1][0] if first_epoch > 0 else launched
    split["startup"] = last - launched
    for stamp, phase in events[first_epoch:]:
        if phase is not None:
            split[phase] += stamp - last
            last = stamp
    split["finish"] = ended - last
    return split


def evaluate_like_reference(model, evaluate: Callable[[], object]) -> float:
    """Seconds of one evaluation pass of a torchvision peer, as its reference train.py runs after every epoch."""
    started = time.perf_counter()
    model.eval()
    evaluate()
    return time.perf_counter() - started


def reference_seconds(elapsed: float, evaluating: float, evaluated: bool) -> dict[str, float]:
    """`seconds`: the peer's training loop alone; `seconds_as_run` (when it evaluated every epoch): the loop and
    those evaluations, the "Training time" the reference's train.py prints."""
    loop = {"seconds": elapsed - evaluating}
    return {**loop, "seconds_as_run": elapsed} if evaluated else loop


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else float("inf")


def write_json(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written {out}")


def load_now() -> list[float]:
    return list(os.getloadavg())
