"""Counting what a model costs, from the real modules while they run.

MAdds are counted the way the MobileNet papers count them: multiply-adds of conv and linear
layers only (BN, activations, pooling and additions are left out). Params are all trainable
parameters of the model (BN included), split by layer type as MobileNetV1's Table 2 does.
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

LAYER_TYPES = ("1x1 conv", "depthwise conv", "full conv", "fully connected")


def layer_type(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "fully connected"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise conv"
        if module.kernel_size == (1, 1) and module.groups == 1:
            return "1x1 conv"
        return "full conv"
    return None


def _module_madds(module: nn.Module, output: torch.Tensor, batch: int) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() // batch * (module.in_channels // module.groups) * kh * kw
    return output.numel() // batch * module.in_features  # nn.Linear


@dataclass
class Complexity:
    madds: int = 0
    params: int = 0
    madds_by_type: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LAYER_TYPES, 0))
    params_by_type: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LAYER_TYPES, 0))

    def share(self) -> dict[str, tuple[float, float]]:
        """Percentage of MAdds and of params per layer type."""
        return {t: (100.0 * self.madds_by_type[t] / max(self.madds, 1),
                    100.0 * self.params_by_type[t] / max(self.params, 1)) for t in LAYER_TYPES}


@torch.no_grad()
def count_complexity(model: nn.Module, images: torch.Tensor) -> Complexity:
    """Run `model(images)` once with hooks on every conv and linear layer; MAdds are per image."""
    result = Complexity(params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    batch = images.shape[0]
    handles = []

    def hook(module, _inputs, output):
        kind = layer_type(module)
        madds = _module_madds(module, output, batch)
        result.madds += madds
        result.madds_by_type[kind] += madds

    for module in model.modules():
        kind = layer_type(module)
        if kind is None:
            continue
        handles.append(module.register_forward_hook(hook))
        result.params_by_type[kind] += sum(p.numel() for p in module.parameters(recurse=False))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return result


@torch.no_grad()
def materialized_memory(model: nn.Module, images: torch.Tensor, bytes_per_element: int = 2
                        ) -> dict[tuple[int, int], tuple[int, int]]:
    """The MobileNetV2 paper's Table 3 measure: for each spatial size, the largest tensor that
    must be materialised, as {(H, W): (channels, bytes)} for one image.

    Only the outputs of `model.materialized_modules()` count (block outputs: a V2 bottleneck's
    expansion is streamed inside the block and never held whole).
    """
    largest: dict[tuple[int, int], tuple[int, int]] = {}

    def hook(_module, _inputs, output):
        channels = output.shape[1]
        size = tuple(output.shape[2:]) if output.dim() == 4 else (1, 1)
        nbytes = output[0].numel() * bytes_per_element
        if nbytes > largest.get(size, (0, 0))[1]:
            largest[size] = (channels, nbytes)

    handles = [m.register_forward_hook(hook) for m in model.materialized_modules()]
    was_training = model.training
    model.eval()
    try:
        model(images[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return dict(sorted(largest.items(), key=lambda kv: -kv[0][0] * kv[0][1]))


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of every tensor storage created inside the mode and the peak held at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


@torch.no_grad()
def eager_peak_memory(model: nn.Module, images: torch.Tensor) -> int:
    """Peak bytes of activations that plain eager PyTorch holds at once during inference."""
    was_training = model.training
    model.eval()
    try:
        with _LiveTensorBytes() as tracker:
            out = model(images[:1])
            del out
    finally:
        model.train(was_training)
    return tracker.peak


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, images: torch.Tensor, runs: int = 20, warmup: int = 5) -> float:
    """Median wall time of `model(images)` in milliseconds, after `warmup` untimed runs."""
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(images)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


def by_resolution_table(memory: dict[tuple[int, int], tuple[int, int]]) -> list[dict]:
    rows = [{"size": f"{h}x{w}", "channels": c, "kbytes": b / 1000} for (h, w), (c, b) in memory.items()]
    return rows


__all__ = ["Complexity", "count_complexity", "materialized_memory", "eager_peak_memory",
           "cpu_latency_ms", "layer_type", "LAYER_TYPES", "by_resolution_table"]
