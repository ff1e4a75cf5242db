"""amp=auto: bf16 autocast only where the hardware computes bf16 natively; evaluation always in fp32."""
import pytest
import torch

from tasks.errors import ConfigError
from tasks.training import precision
from tasks.training.precision import resolve_amp


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, None)])
def test_auto_follows_the_hardware(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    amp, why = resolve_amp("auto", torch.device("cpu"))
    assert amp == expected and ("natively" in why if native else "fp32" in why)


def test_explicit_choices_pass_through_and_others_are_refused():
    assert resolve_amp(None, torch.device("cpu"))[0] is None
    assert resolve_amp("bf16", torch.device("cpu"))[0] == "bf16"
    with pytest.raises(ConfigError, match="amp=fp8 is not allowed; expected null, bf16, fp16 or auto"):
        resolve_amp("fp8", torch.device("cpu"))


def test_native_bf16_on_this_cpu_is_what_onednn_reports():
    assert precision.native_bf16(torch.device("cpu")) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
