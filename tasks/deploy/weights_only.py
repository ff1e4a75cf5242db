"""`python -m tasks.export checkpoint=... format=weights`: a small inference-only checkpoint.

It keeps what using the model needs (the evaluated weights, the training config, the artifact) and drops
what only training needs (optimizer and scheduler state, the raw weights behind an EMA, RNG state, the
grad scaler, history), so every entry point that takes a checkpoint takes it, and nothing more.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tasks.deploy.sidecar import refuse_to_overwrite
from tasks.resolve import check_file_config
from tasks.training.artifact import artifact_without_dataset
from tasks.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tasks.training.trained import BUILT_SECTIONS, file_config

WEIGHTS_FORMAT = "mobilevision-weights"
KEPT = ("model", "config", "artifact", "epoch", "step", "best_metric", "primary_metric")


def export_weights(checkpoint: str | Path, output: str | Path, trusted: Sequence[str] = (),
                   overwrite: bool = False) -> Path:
    """`checkpoint` -> `output`, an inference-only checkpoint; returns `output`."""
    output = Path(output)
    refuse_to_overwrite([output], overwrite)
    if Path(checkpoint).resolve() == output.resolve():
        raise CheckpointError(f"output={output} is the checkpoint itself; expected another file name.")
    state = load_checkpoint(checkpoint)
    if not state.get("config"):
        raise CheckpointError(f"checkpoint {checkpoint} carries no training config; expected one written by "
                              f"tasks.train.")
    config = file_config(state, checkpoint)
    for section in BUILT_SECTIONS:  # what we pass on must be as safe to load as what we read
        check_file_config(config[section], f"checkpoint {checkpoint}", trusted, path=section)
    small = {key: state[key] for key in KEPT if key in state} | {"config": config}
    small["artifact"] = state.get("artifact") or artifact_without_dataset(config, f"checkpoint {checkpoint}")
    small["format"] = WEIGHTS_FORMAT
    small["source_checkpoint"] = str(checkpoint)
    return save_checkpoint(small, output)
