"""tasks.training.checkpoint against hostile and broken files: a pickled payload is refused without running, a
truncated or random file gets one sentence naming it, and a write that fails midway loses nothing."""
import builtins
import errno
import os
import random
import re
from pathlib import Path

import pytest
import torch

from tasks.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def one_sentence_naming(message: str, path: Path) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    assert str(path) in message, message


def real_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 5, 8)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "step": 120,
            "config": {"dataset": {"root": "data/shapes_det"}, "lr": 0.1}, "metrics": {"AP": 0.25}}


class ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpenPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_a_saved_checkpoint_loads_back_exactly(tmp_path):
    state = real_state()
    loaded = load_checkpoint(save_checkpoint(state, tmp_path / "last.ckpt"))
    assert loaded.keys() == state.keys() and loaded["epoch"] == 3 and loaded["config"] == state["config"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("payload", [ShellPayload, OpenPayload])
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({**real_state(), "extra": payload(marker)}, path)
    # The file really is hostile: an unrestricted unpickler runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint ran the pickled payload"
    one_sentence_naming(str(err.value), path)
    assert "refused" in str(err.value)


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    data = save_checkpoint(real_state(), tmp_path / "good.ckpt").read_bytes()
    for name, cut in (("half", len(data) // 2), ("head", 10), ("tail_missing", len(data) - 100), ("empty", 0)):
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        one_sentence_naming(str(err.value), path)


def test_random_bytes_and_text_name_the_file(tmp_path):
    rng = random.Random(0)
    files = {f"random_{n}.ckpt": rng.randbytes(n) for n in (1, 7, 64, 300, 5000, 100_000)}
    files["text.ckpt"] = b"hello world, this is not a checkpoint\n"
    files["pickled_list.ckpt"] = b"\x80\x02]q\x00(K\x01K\x02e."  # a plain pickle, not torch.save's zip
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        one_sentence_naming(str(err.value), path)


def test_not_a_mobilevision_checkpoint_and_missing_file(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' entry") as err:
        load_checkpoint(tmp_path / "other.ckpt")
    one_sentence_naming(str(err.value), tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nope.ckpt")
    one_sentence_naming(str(err.value), tmp_path / "nope.ckpt")


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(real_state(seed=1), tmp_path / "last.ckpt")
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the whole file, then keep only its first half: a full disk
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as err:
        save_checkpoint(real_state(seed=2), path)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind
    assert path.read_bytes() == before
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    for key, value in real_state(seed=1)["model"].items():
        assert torch.equal(loaded["model"][key], value)
