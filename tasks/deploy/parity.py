"""Parity of a deployed graph with the PyTorch model it came from, on final results (not raw tensors).

`compare_detections` / `compare_label_maps` compare per-image results in the head's predict() format;
`check_in_graph_parity` runs a graph whose outputs end in the post-processing (tasks/deploy/in_graph.py)
and the PyTorch model on the same images and returns the figures the sidecar records.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from tasks.deploy.in_graph import detections_to_results

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]

SCORE_TOLERANCE = 1e-4  # the bar for float32 graphs: same boxes and labels, scores within 1e-4
BOX_TOLERANCE_PX = 1e-2


def compare_detections(got: Sequence[Mapping[str, torch.Tensor]], expected: Sequence[Mapping[str, torch.Tensor]],
                       min_iou: float = 0.5) -> dict[str, Any]:
    """Per image, each expected detection (highest score first) is matched to the unmatched detection of the
    same label that overlaps it most (IoU >= `min_iou`); matching rather than comparing in order keeps
    detections with tied scores from counting as differences. Returns the counts, the matched share and
    the largest score / box (pixels) differences over matched pairs."""
    count_mismatches = matched = total = 0
    score_diff = box_diff = 0.0
    for g, e in zip(got, expected):
        g_boxes, e_boxes = g["boxes"].cpu().float(), e["boxes"].cpu().float()
        count_mismatches += int(len(g_boxes) != len(e_boxes))
        total += len(e_boxes)
        if not len(e_boxes) or not len(g_boxes):
            continue
        same_label = e["labels"].cpu()[:, None] == g["labels"].cpu()[None, :]
        iou = torch.where(same_label, box_iou(e_boxes, g_boxes), torch.full(same_label.shape, -1.0))
        for i in range(len(e_boxes)):
            j = int(iou[i].argmax())
            if float(iou[i, j]) < min_iou:
                continue
            iou[:, j] = -1.0  # taken
            matched += 1
            score_diff = max(score_diff, abs(float(g["scores"][j]) - float(e["scores"][i])))
            box_diff = max(box_diff, float((g_boxes[j] - e_boxes[i]).abs().max()))
    return {"detections": [len(e["scores"]) for e in expected], "count_mismatches": count_mismatches,
            "unmatched": total - matched, "matched_share": matched / max(total, 1),
            "max_score_diff": score_diff, "max_box_diff_px": box_diff}


def compare_label_maps(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Share of pixels with the same class, over all images."""
    same = sum(int((g.cpu() == e.cpu()).sum()) for g, e in zip(got, expected))
    total = sum(e.numel() for e in expected)
    return {"pixels": total, "pixel_agreement": same / max(total, 1)}


def detections_equal(figures: Mapping[str, Any], score_tolerance: float = SCORE_TOLERANCE) -> bool:
    return (figures["count_mismatches"] == 0 and figures["unmatched"] == 0
            and figures["max_score_diff"] <= score_tolerance and figures["max_box_diff_px"] <= BOX_TOLERANCE_PX)


def reference_results(model: nn.Module, images: torch.Tensor, task: str) -> list:
    """The PyTorch model's own results for images that fill the whole input."""
    size = tuple(images.shape[-2:])
    with torch.no_grad():
        outputs = model(images)
        if task == "detection":
            return model.predict(outputs, [size] * images.shape[0])
        logits = outputs["logits"]
        if tuple(logits.shape[-2:]) != size:
            logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return [label_map for label_map in logits.argmax(1)]


def check_in_graph_parity(run: Runner, model: nn.Module, meta: Mapping[str, Any], example: torch.Tensor,
                          batch_sizes: Sequence[int] = (2, 1), strict: bool = True) -> dict[str, Any]:
    """Run the graph (`run`: numpy images -> outputs) and the model on the first `b` example images for each
    b; with `strict`, a float32 graph that does not give the same detections (or > 0.1 % other pixels) is an
    error."""
    model = model.eval()
    got_all: list = []
    expected_all: list = []
    for b in batch_sizes:
        images = example[:b]
        outputs = {k: torch.from_numpy(np.asarray(v)) for k, v in run(images.numpy()).items()}
        if meta["task"] == "detection":
            got_all += detections_to_results(outputs, [tuple(images.shape[-2:])] * b)
        else:
            got_all += list(outputs["labels"])
        expected_all += reference_results(model, images, meta["task"])
    if meta["task"] == "detection":
        figures = compare_detections(got_all, expected_all)
        if strict and not detections_equal(figures):
            raise RuntimeError(f"the graph's detections differ from PyTorch's: {figures}.")
    else:
        figures = compare_label_maps(got_all, expected_all)
        if strict and figures["pixel_agreement"] < 0.999:
            raise RuntimeError(f"the graph's label maps differ from PyTorch's: {figures}.")
    return {"batches": list(batch_sizes), **figures}


RAW_OUTPUTS = ("cls_logits", "bbox_regression", "logits")


def compare_runner(runner: Any, model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """A deployed model's runner (tasks/deploy/runner.py) against the PyTorch model on `images` [B, 3, H, W]:
    the largest absolute and relative (max |diff| / max |pytorch|) differences of the raw outputs both
    give, and the final results compared as in `check_in_graph_parity` (images filling the input)."""
    model = model.eval()
    task = runner.task
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    with torch.no_grad():
        expected_raw = dict(model(images))
    got_raw = runner(images)
    absolute, relative = {}, {}
    for name in RAW_OUTPUTS:
        if name in got_raw and name in expected_raw:
            diff = float((got_raw[name].float() - expected_raw[name].float()).abs().max())
            absolute[name] = diff
            relative[name] = diff / max(float(expected_raw[name].abs().max()), 1e-30)
    got = runner.predict(got_raw, sizes)
    if task == "detection":
        final = compare_detections(got, reference_results(model, images, task))
        final["detections_equal"] = detections_equal(final)
    else:
        final = compare_label_maps([g["mask"] for g in got], reference_results(model, images, task))
    return {"images": int(images.shape[0]), "raw_max_abs_diff": absolute, "raw_relative_diff": relative, **final}


__all__ = ["check_in_graph_parity", "compare_runner", "compare_detections", "compare_label_maps", "detections_equal",
           "reference_results", "SCORE_TOLERANCE"]
