"""Batching and loading shared by every task."""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tasks import distributed as dist


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Images of one size stack into [B, 3, H, W]; targets stay one dict per image."""
    if len(batch) == 0:
        raise ValueError("collate got an empty batch; expected at least one (image, target) pair.")
    images, targets = zip(*batch)
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(f"collate got images of shapes {sorted(shapes)}; expected one size "
                         f"(resize or pad in the transforms).")
    return torch.stack(images), list(targets)


def seed_worker(worker_id: int) -> None:
    """Each worker (and each epoch) gets its own augmentation stream; albumentations keeps its own
    generator, which forked workers would otherwise share."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transforms = getattr(info.dataset, "transforms", None) if info else None
    if hasattr(transforms, "set_random_seed"):
        transforms.set_random_seed(seed)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if dist.is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, drop_last=train,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker,
                      generator=generator, persistent_workers=False)
