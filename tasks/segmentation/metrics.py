"""Semantic segmentation metrics from a confusion matrix, and multi-scale + flip inference ("MF")."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _mask_of(item) -> torch.Tensor:
    return item["mask"] if isinstance(item, Mapping) else item


class ConfusionMatrix:
    """Accumulates a K x K int64 confusion matrix (rows = truth, columns = prediction) on the fly.

    `compute()` returns fractions in [0, 1]: "mIoU", "pixel_acc", "mean_acc" and "IoU/<class name>".
    Pixels whose truth is `ignore_index` are left out. A class absent from both truth and prediction
    has no IoU (NaN, reported as such) and is excluded from the mIoU mean, as in DeepLab's and the
    VOC devkit's evaluation; a class absent from the truth but predicted somewhere has IoU 0. Likewise
    "mean_acc" averages per-class recall over the classes present in the truth.
    """

    primary = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, targets: Iterable, predictions: Iterable) -> None:
        """`targets` and `predictions`: lists of {"mask": [H, W] int} (or of bare tensors), pairwise
        the same size."""
        targets, predictions = list(targets), list(predictions)
        if len(targets) != len(predictions):
            raise ValueError(f"update got {len(targets)} targets and {len(predictions)} predictions.")
        k = self.num_classes
        for target, prediction in zip(targets, predictions):
            truth, pred = _mask_of(target), _mask_of(prediction)
            pred = pred.to(truth.device)
            if truth.shape != pred.shape:
                raise ValueError(f"a predicted mask of shape {tuple(pred.shape)} does not match its target "
                                 f"mask of shape {tuple(truth.shape)}.")
            truth, pred = truth.reshape(-1).long(), pred.reshape(-1).long()
            keep = truth != self.ignore_index
            truth, pred = truth[keep], pred[keep]
            if truth.numel() == 0:
                continue
            for what, values in (("target", truth), ("predicted", pred)):
                bad = values[(values < 0) | (values >= k)]
                if bad.numel():
                    raise ValueError(f"a {what} mask holds class {int(bad[0])}; expected 0..{k - 1}"
                                     + (f" or ignore_index={self.ignore_index}." if what == "target" else "."))
            counts = torch.bincount(truth * k + pred, minlength=k * k)
            self.matrix += counts.reshape(k, k).cpu()

    def compute(self) -> dict[str, float]:
        m = self.matrix.double()
        tp = m.diag()
        truth = m.sum(1)
        union = truth + m.sum(0) - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        recall = torch.where(truth > 0, tp / truth.clamp(min=1), nan)
        total = truth.sum()
        result = {
            "mIoU": float(iou.nanmean()) if (union > 0).any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(recall.nanmean()) if (truth > 0).any() else float("nan"),
        }
        for name, value in zip(self.class_names, iou.tolist()):
            result[f"IoU/{name}"] = value
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.matrix.clone()}

    state = state_dict

    def merge(self, states) -> None:
        """Add other evaluators' `state()` (one, or a list of them) into this one."""
        for state in [states] if isinstance(states, Mapping) else states:
            other = state["confusion"]
            if other.shape != self.matrix.shape:
                raise ValueError(f"cannot merge a {tuple(other.shape)} confusion matrix into a "
                                 f"{tuple(self.matrix.shape)} one.")
            self.matrix += other.to(self.matrix)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when torch.distributed is initialised (no-op otherwise)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        matrix = self.matrix
        if dist.get_backend() == "nccl":
            matrix = matrix.cuda()
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        self.matrix = matrix.cpu()


@torch.no_grad()
def multiscale_flip_logits(model_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                           scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip: bool = True
                           ) -> torch.Tensor:
    """Average softmax PROBABILITIES [B, K, H, W] over rescaled (and mirrored) copies of `images`.

    `model_fn(images) -> logits [B, K, h, w]` at any resolution; each output is resized (bilinear) to
    the input's H x W before the softmax. The argmax over dim 1 is the paper's "MF" prediction.
    """
    height, width = images.shape[-2:]
    total = None
    count = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            inputs = scaled.flip(-1) if mirrored else scaled
            logits = model_fn(inputs)
            if mirrored:
                logits = logits.flip(-1)
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
            count += 1
    return total / count


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every `stride`, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


@torch.no_grad()
def sliding_window_logits(model_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: int,
                          overlap: float = 1 / 3) -> torch.Tensor:
    """Logits [B, K, H, W] of an input larger than the training crop, from `window` x `window` tiles
    (overlapping by `overlap`; each tile's logits resized to the tile, overlaps averaged), so every
    pixel is seen at the scale the model was trained at."""
    height, width = images.shape[-2:]
    stride = max(1, int(window * (1 - overlap)))
    total, count = None, torch.zeros(1, 1, height, width, device=images.device)
    for top in window_starts(height, window, stride):
        for left in window_starts(width, window, stride):
            tile = images[..., top:top + window, left:left + window]
            logits = F.interpolate(model_fn(tile).float(), size=tile.shape[-2:], mode="bilinear",
                                   align_corners=False)
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], height, width, dtype=torch.float32)
            total[..., top:top + window, left:left + window] += logits
            count[..., top:top + window, left:left + window] += 1
    return total / count


__all__ = ["ConfusionMatrix", "multiscale_flip_logits", "sliding_window_logits"]
