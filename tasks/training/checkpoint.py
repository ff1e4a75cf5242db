"""Writing checkpoints so a crash never loses the previous one, and reading them safely."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from tasks.errors import CheckpointError  # noqa: F401  (re-exported: callers catch it from here)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file beside `path`, then rename over it (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique per process: two writers never share it
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _refusal(err: pickle.UnpicklingError) -> str:
    """The line of torch's long weights_only message that says what was refused, as a clause."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    for line in text.splitlines():
        if re.search(r"unsupported|GLOBAL|not an allowed global", line, re.IGNORECASE):
            return " ".join(line.split()).rstrip(".").replace(". ", "; ")
    return "weights_only=True would not load it"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint is untrusted input and must not run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is at the very end
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read (not a complete "
                              f"zip archive); expected a file written by torch.save.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} was refused: it holds more than tensors and plain data "
                              f"({_refusal(err)}), and loading it could run code.") from None
    except Exception as err:  # a damaged archive fails in many ways (RuntimeError, KeyError, EOFError...)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({type(err).__name__}); expected a file written by torch.save.") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a mobilevision checkpoint: expected a dict with "
                              f"a 'model' entry, found {type(state).__name__}"
                              f"{' with keys ' + str(sorted(state)[:5]) if isinstance(state, dict) else ''}.")
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path,
                       num_classes: int | None = None, reinit_head_mismatches: bool = False) -> list[str]:
    """Load `state["model"]` into `model`, or fail with one sentence naming the first key that does not fit
    (and the class counts, when the checkpoint was trained for another number of classes).

    `reinit_head_mismatches` (fine-tuning with init_from): head tensors whose shapes differ (the class
    predictors of a checkpoint trained on other classes) keep the model's fresh initialisation instead;
    their names are returned. The backbone must still fit exactly."""
    weights, own = state["model"], model.state_dict()
    trained_classes = (state.get("config") or {}).get("dataset", {}).get("num_classes")
    why = ""
    if num_classes is not None and trained_classes is not None and trained_classes != num_classes:
        why = f" (it was trained for num_classes={trained_classes}, this model has num_classes={num_classes})"
    reinitialised = []
    for key, tensor in own.items():
        if key not in weights:
            raise CheckpointError(f"checkpoint {path} does not fit the model{why}: the model's {key} "
                                  f"is not in it.")
        if weights[key].shape != tensor.shape:
            if reinit_head_mismatches and key.startswith("head."):
                reinitialised.append(key)
                continue
            raise CheckpointError(f"checkpoint {path} does not fit the model{why}: {key} is "
                                  f"{list(weights[key].shape)} in the checkpoint but {list(tensor.shape)} "
                                  f"in the model.")
    extra = [k for k in weights if k not in own]
    if extra:
        raise CheckpointError(f"checkpoint {path} does not fit the model{why}: its {extra[0]} has no place in it.")
    model.load_state_dict({k: own[k] if k in reinitialised else v for k, v in weights.items()})
    return reinitialised
