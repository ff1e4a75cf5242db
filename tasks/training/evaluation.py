"""One evaluation pass: the model over a loader, predictions into the dataset's evaluator, ranks merged."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from tasks.segmentation.metrics import multiscale_flip_logits, sliding_window_logits
from tasks.training import distributed as dist
from tasks.training.loaders import set_loader_epoch

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, AveragedModel)) else model


def to_device(targets: Iterable[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets]


def prediction_sizes(targets: list[dict]) -> list[tuple[int, int]]:
    """Where predictions are compared: a segmentation target's mask (the padded input), else the
    original image (detection boxes are scored in original pixels)."""
    return [tuple(t["mask"].shape[-2:]) if "mask" in t else tuple(int(v) for v in t["orig_size"])
            for t in targets]


def _sliding_window(targets: list[dict], images: torch.Tensor) -> int | None:
    """The training crop size when a segmentation input is larger than it (evaluated window by window)."""
    window = targets[0].get("window") if targets else None
    return int(window) if window and max(images.shape[-2:]) > int(window) else None


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, evaluator: Any, device: torch.device,
             progress: bool = True, amp: str | None = None, channels_last: bool = False,
             multiscale_flip: Sequence[float] | None = None) -> dict[str, float]:
    """Run the model over `loader` (each rank its share), feed the evaluator, merge the ranks'
    states on rank 0, compute there, and give every rank the result.

    `multiscale_flip`: segmentation only, the scales of the papers' "MF" inference (each scale and
    its mirror image averaged as probabilities)."""
    net = unwrap(model)
    net.eval()
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    set_loader_epoch(loader, 0)
    for images, targets in tqdm(loader, desc="evaluate", leave=False,
                                disable=not (progress and dist.is_main()), dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        window = _sliding_window(targets, images)
        with autocast:
            if multiscale_flip:
                outputs = {"logits": multiscale_flip_logits(lambda x: net(x)["logits"], images, multiscale_flip)}
            elif window:
                outputs = {"logits": sliding_window_logits(lambda x: net(x)["logits"], images, window)}
            else:
                outputs = net(images)
        outputs = {k: v.float() if torch.is_tensor(v) else v for k, v in outputs.items()}
        if targets and "valid_size" in targets[0]:  # segmentation scored against the original-resolution mask
            predictions = net.predict(outputs, prediction_sizes(targets), input_size=tuple(images.shape[-2:]),
                                      valid_sizes=[tuple(int(v) for v in t["valid_size"]) for t in targets])
        else:
            predictions = net.predict(outputs, prediction_sizes(targets))
        predictions = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()} for p in predictions]
        evaluator.update(targets, predictions)
        skipped = [m for t in targets for m in t.get("skipped", ())]
        if skipped:
            log.warning("evaluation skipped %d unreadable files (left out of the metric): %s", len(skipped), skipped)
    if dist.is_distributed():
        states = dist.all_gather_objects(evaluator.state())
        if dist.is_main():
            evaluator.merge(states[1:])
    metrics = evaluator.compute() if dist.is_main() else None
    return dist.all_gather_objects(metrics)[0] if dist.is_distributed() else metrics
