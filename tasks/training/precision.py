"""Which autocast precision a run trains in. `amp=auto` picks bf16 only where the hardware computes it
natively (a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16, as oneDNN reports it), and fp32 elsewhere:
emulated bf16 would be slower than fp32."""
from __future__ import annotations

import torch

from tasks.errors import ConfigError

AMP_CHOICES = (None, "bf16", "fp16", "auto")


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def resolve_amp(amp: str | None, device: torch.device) -> tuple[str | None, str]:
    """(the autocast precision to train in: None, "bf16" or "fp16"; one phrase saying why)."""
    if amp not in AMP_CHOICES:
        raise ConfigError(f"amp={amp} is not allowed; expected null, bf16, fp16 or auto.")
    if amp != "auto":
        return amp, "as set"
    if native_bf16(device):
        return "bf16", f"amp=auto: this {device.type.upper()} computes bf16 natively"
    return None, f"amp=auto: this {device.type.upper()} has no native bf16, so fp32"


__all__ = ["AMP_CHOICES", "native_bf16", "resolve_amp"]
