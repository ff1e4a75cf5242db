"""`make demo`: train and evaluate on the built-in shapes data, then print the metrics.

Runs the same code path as `python -m tasks.train experiment=demo_ssdlite_shapes` (the shapes are
written in the real COCO / VOC layouts and read by the real loaders).
"""
from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from tasks.cli import CONFIG_DIR
from tasks.segmentation.palette import overlay
from tasks.train import train
from tasks.training.trained import load_trained_model

DEMOS = (
    ("detection", "demo_ssdlite_shapes", "AP", 0.5),
    ("segmentation", "demo_deeplabv3_shapes", "mIoU", 0.75),
)


def run_demo(experiment: str, run_dir: Path, overrides: list[str] = ()) -> tuple[dict, float]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    start = time.perf_counter()
    metrics = train(cfg, run_dir)
    return metrics, (time.perf_counter() - start) / 60


@torch.no_grad()
def write_overlays(run_dir: Path, count: int = 4) -> list[Path]:
    """Image | truth | prediction side by side, for the first `count` val images."""
    model, cfg = load_trained_model(run_dir / "best.ckpt")
    val = instantiate(cfg.dataset.val)
    paths = []
    for index in range(min(count, len(val))):
        image, truth = val.load(index)
        tensor, target = val[index]
        outputs = model(tensor[None])
        predicted = model.predict(outputs, [tuple(target["mask"].shape)])[0]["mask"]
        h, w = truth.shape
        panels = [image, overlay(image, truth), overlay(image, predicted[:h, :w].numpy())]
        path = run_dir / "overlays" / f"{target['image_id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(panels, axis=1)).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(sys.argv[1:] if argv is None else argv)
    root = Path("outputs/demo") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    summary, failed, reports = [], False, []
    for task, experiment, metric, target in DEMOS:
        if not (Path(__file__).parents[1] / "conf" / "experiment" / f"{experiment}.yaml").exists():
            continue
        print(f"\n== {task}: python -m tasks.train experiment={experiment}", flush=True)
        metrics, minutes = run_demo(experiment, root / task, overrides)
        if task == "segmentation":
            overlays = write_overlays(root / task)
            print(f"overlays (image | truth | prediction): {overlays[0].parent}")
        reports += [f"{task:<13} {path}" for path in sorted((root / task).glob("reports/epoch_*/report.html"))[-1:]]
        ok = metrics[metric] >= target
        failed |= not ok
        summary.append(f"{task:<13} {metric} = {metrics[metric]:.3f} (target >= {target}) in {minutes:.1f} min"
                       f"  {'ok' if ok else 'BELOW TARGET'}   -> {root / task}")
    print("\n== demo summary")
    print("\n".join(summary))
    if reports:
        print("\n== evaluation reports (tables and pictures; open in a browser)")
        print("\n".join(reports))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
