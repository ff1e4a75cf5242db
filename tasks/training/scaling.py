"""What changes with the number of processes and the batch: the learning rate and SyncBatchNorm."""
from __future__ import annotations

from tasks.errors import ConfigError

SMALL_BN_BATCH = 8  # below this many images per process, BN statistics are noisy enough to hurt (DeepLabv3 sec. 4.1)


def scaled_lr(lr: float, batch_size: int, world_size: int, reference_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al. 2017): `lr` is stated for `reference_batch` images per
    step (all processes together); the run's global batch gets lr x global / reference. None: as given."""
    if reference_batch is None:
        return float(lr)
    if not isinstance(reference_batch, int) or isinstance(reference_batch, bool) or reference_batch <= 0:
        raise ConfigError(f"optim.reference_batch={reference_batch} is not allowed; expected the positive global "
                          f"batch size that optim.optimizer.lr is stated for, or null (no scaling).")
    return float(lr) * batch_size * world_size / reference_batch


def use_sync_bn(setting: bool | str, batch_size: int, world_size: int, on_gpu: bool = True) -> bool:
    """sync_bn=auto: on in a multi-process GPU run whose per-process batch is below SMALL_BN_BATCH
    (PyTorch's SyncBatchNorm runs on CUDA only, so auto stays off on CPU)."""
    if setting == "auto":
        return on_gpu and world_size > 1 and batch_size < SMALL_BN_BATCH
    if isinstance(setting, bool):
        if setting and world_size > 1 and not on_gpu:
            raise ConfigError("sync_bn=true needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only); use "
                              "sync_bn=false or sync_bn=auto on CPU.")
        return setting and world_size > 1
    raise ConfigError(f"sync_bn={setting} is not allowed; expected true, false or auto.")
