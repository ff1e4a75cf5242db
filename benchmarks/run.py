"""Side-by-side speed against torchvision in interleaved rounds, reported as ratios.

    python -m benchmarks.run                 # full run (~6 minutes on 2 cores, deploy + data ~1.7 of them)
    python -m benchmarks.run --quick         # few repeats, to check that everything runs
    python -m benchmarks.run --threads 1 --only segmentation --out /tmp/seg.json
    python -m benchmarks.run --only deploy --only data   # deployment paths; data loading vs training step

See benchmarks/README.md for what is measured and how to read the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from . import dataloading, deploy, detection, postprocess, segmentation

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "bench" / "latest.json"
TASKS = ("detection", "segmentation", "deploy", "postprocess", "data")
# own tables, under their own key of the results
SECTIONS = {"deploy": deploy, "postprocess": postprocess, "data": dataloading}


@dataclass(frozen=True)
class Plan:
    detection: detection.DetectionSettings
    segmentation: segmentation.SegmentationSettings
    deploy: deploy.DeploySettings = deploy.DeploySettings()
    data: dataloading.DataSettings = dataloading.DataSettings()
    postprocess: postprocess.PostprocessSettings = postprocess.PostprocessSettings()


# Full: 6.2 min on 2 idle cores (2026-11-30, load average 0.3 -> 1.9), detection alone 2.3 min since its
# training rows run 6 contenders x 7 rounds in two child processes (benchmarks/processes.py); deploy + data:
# 99 s measured on 2 idle cores, exports and quantization included. On a busy machine the figures are not
# worth quoting anyway (8.5 min measured at a load average of 3-7 before the child processes).
FULL = Plan(detection.DetectionSettings(), segmentation.SegmentationSettings())
QUICK = Plan(detection.DetectionSettings(train_repeats=1, train_warmup=1, infer_repeats=3, warmup=1),
             segmentation.SegmentationSettings(repeats=2, warmup=1),
             deploy.DeploySettings(repeats=2, warmup=1, peak_repeats=2, peak_warmup=1, calibration_images=2),
             dataloading.DataSettings(num_images=48, train_repeats=1, train_warmup=1),
             postprocess.PostprocessSettings(repeats=2, warmup=1))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores_available": available_cores(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "git": git_commit(),
        "loadavg_start": list(os.getloadavg()),
    }


def run_all(plan: Plan, only: Sequence[str] = TASKS, log=print) -> dict:
    results: dict = {"environment": environment(), "plan": {}, "rows": [], "comparisons": [], "checks": {}}
    start = time.perf_counter()
    for task in only:
        module = {"detection": detection, "segmentation": segmentation, **SECTIONS}[task]
        settings = getattr(plan, task)
        log(f"--- {task} ---")
        part = module.run(settings, log=log)
        results["plan"][task] = part["settings"]
        results["checks"][task] = part["checks"]
        if task in SECTIONS:
            results[task] = part["section"]
        else:
            results["rows"] += part["rows"]
            results["comparisons"] += part["comparisons"]
    results["environment"]["loadavg_end"] = list(os.getloadavg())
    results["environment"]["wall_s"] = round(time.perf_counter() - start, 1)
    return results


def format_table(results: dict) -> str:
    width = max([52, *(len(row["model"]) for row in results["rows"])])
    header = (f"{'model':<{width}} {'params M':>8} {'MAdds B':>8} {'median ms':>10} {'IQR ms':>8}  "
              f"{'ratio vs peer [q1, q3]':<22}")
    faults = "  page faults/step"  # rows timed in a child process (benchmarks/processes.py) count them
    lines, measure = [], None
    for row in results["rows"]:
        if (row["task"], row["measure"]) != measure:
            measure = (row["task"], row["measure"])
            top = header + (faults if "minor_faults_per_step" in row else "")
            lines += ["", f"{row['task']}: {row['measure']}", top.rstrip(), "-" * len(top.rstrip())]
        elif row["role"] == "ours" and len(lines) and not lines[-1].startswith("-"):
            lines.append("")  # next pair under the same measure
        t, r = row["time_ms"], row["ratio"]
        ratio = f"{r['median']:.2f} [{r['q1']:.2f}, {r['q3']:.2f}]" if r else "(peer)"
        line = (f"{row['model']:<{width}} {row['params'] / 1e6:>8.2f} {row['madds'] / 1e9:>8.2f} "
                f"{t['median']:>10.1f} {t['iqr']:>8.1f}  {ratio:<22}")
        if "minor_faults_per_step" in row:
            line += f"  {row['minor_faults_per_step']['median']:>{len(faults) - 2},.0f}"
        lines.append(line.rstrip())
    if results["rows"]:
        lines += ["", "ratio = the upper row's time / the lower row's (ours / torchvision's, unless the measure names "
                      "two of ours),", "median of the per-round ratios over interleaved rounds (< 1: the upper row is "
                      "faster)"]
    for task, module in SECTIONS.items():
        if task in results:
            lines += module.format_table(results[task]).splitlines()
    env = results["environment"]
    load = max(env["loadavg_start"][0], env.get("loadavg_end", [0.0])[0])
    if load > env["cores_available"]:
        lines += ["", f"WARNING: load average reached {load:.1f} on {env['cores_available']} cores: other work "
                      f"competed with this run; its figures are unreliable, run it again on a quiet machine."]
    lines += ["", f"torch {env['torch']}, torchvision {env['torchvision']}, {env['threads']} threads, "
              f"{env['cpu_model']}, {env['date']}, load average {env['loadavg_start'][0]:.1f} -> "
              f"{env.get('loadavg_end', [float('nan')])[0]:.1f}"]
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that it runs, figures are noise")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=available_cores(),
                        help="torch.set_num_threads (default: every core this process may use)")
    parser.add_argument("--only", choices=TASKS, action="append", help="run only this task (repeatable)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1.")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    results = run_all(plan, args.only or TASKS)
    results["environment"]["command"] = " ".join(["python -m benchmarks.run", *(argv if argv is not None
                                                                                  else sys.argv[1:])])
    results["environment"]["quick"] = args.quick
    print(format_table(results))
    write_results(results, args.out)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
