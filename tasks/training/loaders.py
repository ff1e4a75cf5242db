"""Batching, sampling and loading shared by every task.

Every sample's augmentation is seeded from (seed, epoch, index), and the sampler's order from
(seed, epoch): the stream then depends neither on the number of workers nor on where a run was
interrupted, which is what makes resuming exact.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tasks.detection.device_augment import PlannedBatch, PlannedImage
from tasks.errors import DataError
from tasks.training import distributed as dist

log = logging.getLogger(__name__)


def collate(batch: Sequence[tuple[torch.Tensor | PlannedImage, dict]]
            ) -> tuple[torch.Tensor | PlannedBatch, list[dict]]:
    """Images of one size stack into [B, 3, H, W]; targets stay one dict per image. Photos planned for device
    augmentation (any size) become one PlannedBatch."""
    if len(batch) == 0:
        raise ValueError("collate got an empty batch; expected at least one (image, target) pair.")
    images, targets = zip(*batch)
    if all(isinstance(img, PlannedImage) for img in images):
        return PlannedBatch.collate(images), list(targets)
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(f"collate got images of shapes {sorted(shapes)}; expected one size "
                         f"(resize or pad in the transforms).")
    return torch.stack(images), list(targets)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % 2**32


# What a file that breaks during a run raises (a truncated JPEG decoded at a later epoch, a disk error):
# the loaders turn them into one sentence naming the file. ValueError covers tasks.errors.DataError.
UNREADABLE = (OSError, ValueError)


class PerSampleSeeds(Dataset):
    """Wraps a dataset so each item's augmentation is seeded from (seed, epoch, index), and so an item
    that cannot be read is replaced by the next readable one, reported in its target under "skipped"
    (the engine counts those and stops the run past a limit)."""

    def __init__(self, dataset: Dataset, seed: int, max_substitutes: int = 16):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.max_substitutes = max_substitutes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int):
        transforms = getattr(self.dataset, "transforms", None)
        if hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(sample_seed(self.seed, self.epoch, index))
        return self.dataset[index]

    def __getitem__(self, index: int):
        skipped = []
        for attempt in range(self.max_substitutes + 1):
            candidate = (index + attempt) % len(self.dataset)
            try:
                image, target = self._load(candidate)
            except UNREADABLE as err:
                skipped.append(str(err))
                log.warning("skipping unreadable item %d: %s", candidate, err)
                continue
            if skipped:
                target = {**target, "skipped": skipped}
            return image, target
        raise DataError(f"{len(skipped)} items in a row from index {index} cannot be read, first: {skipped[0]}")

    def __getattr__(self, name: str) -> Any:  # evaluator(), num_classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochSampler(Sampler[int]):
    """Order from (seed, epoch); this rank's share; and a start position inside the epoch.

    Training drops the tail that does not divide by the number of ranks, so every rank takes the
    same number of steps (DDP needs that); evaluation keeps every sample exactly once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, drop_uneven: bool):
        self.size, self.shuffle, self.seed, self.drop_uneven = size, shuffle, seed, drop_uneven
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start`: how many of this rank's samples of `epoch` were already consumed."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        end = self.size - self.size % self.world_size if self.drop_uneven else self.size
        return order[self.rank:end:self.world_size][self.start:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def seed_worker(worker_id: int) -> None:
    """Global RNGs of each worker: its own, derived from the loader's seed for this epoch."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # PyTorch gives each worker one thread; OpenCV (decoding, resizing) would otherwise start a pool as large
    # as the machine in every worker, N workers x N threads fighting the training step for the same cores.
    cv2.setNumThreads(1)


class ForkSafeLoader(DataLoader):
    """A DataLoader whose workers do not inherit a running OpenCV thread pool. A worker forked while the parent's
    pool exists hangs for good in seed_worker's cv2.setNumThreads (seen as a stuck `make bench` data run after
    in-process loading): the parent's pool is therefore closed while the workers start, and reopened after."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super()._get_iterator()  # forks the workers
        finally:
            cv2.setNumThreads(threads)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int) -> DataLoader:
    wrapped = PerSampleSeeds(dataset, seed)
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, drop_uneven=train)
    return ForkSafeLoader(wrapped, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=collate, drop_last=train, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed),
                          persistent_workers=False)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Position `loader` at `start_batch` of `epoch` (0 for a fresh epoch)."""
    loader.dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch, start_batch * loader.batch_size)
    if loader.generator is not None:  # worker seeds follow the epoch too
        loader.generator.manual_seed(loader.dataset.seed + epoch)
