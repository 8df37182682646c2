"""Batches for training and evaluation: torch ``DataLoader``s with worker processes, and random
streams that depend on the run's seed, the epoch and the image, never on the machine.

**Order.** Each epoch's order is torch's ``DistributedSampler`` permutation for ``seed`` and the
epoch; process ``r`` of ``W`` takes every ``W``-th index from ``r``, so a step's ``B / W`` images
per process together form the same global batch of ``B`` images that one process would take.

**Augmentation.** Image ``i`` of epoch ``e`` is transformed under the torch seed
:func:`sample_seed` ``(seed, e, i)``, whichever worker, process or accumulation step reads it: a
run resumed at an epoch, run under torchrun, or with other ``--workers``, sees the same pixels.
The sampler hands the dataset ``(epoch, index)`` keys, so persistent workers know the epoch.
MixUp/CutMix run per micro-batch in the training loop, under :func:`batch_seed`: they pair the
images of one process's micro-batch (as timm does), so they alone depend on the layout.

**Errors.** An image that cannot be read inside a worker would reach the main process as a
worker traceback; instead the dataset hands back an :class:`Unreadable` item, the collate passes
it on as the batch, and :func:`batches` raises it as an ``UnrollError`` naming the file.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from unroll.errors import UnrollError

#: odd multipliers that spread (seed, epoch, index) over 63 bits before torch seeds with them
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
#: seeds of the epoch permutations are ``seed * ORDER_STRIDE + epoch``: runs of nearby seeds never share one
ORDER_STRIDE = 100_003


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed image ``index`` is augmented under in ``epoch``."""
    a, b, c = _SEED_MIX
    return (seed * a + (epoch + 1) * b + (index + 1) * c) % (1 << 63)


def batch_seed(seed: int, epoch: int, step: int, part: int) -> int:
    """The torch seed of micro-batch ``part`` (process rank × accumulation steps + micro-batch) of ``step``."""
    return sample_seed(seed, epoch, -(step * 65_536 + part) - 2)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU random stream seeded with ``seed`` inside, as it was outside. (The CPU generator
    itself: ``torch.random.fork_rng`` and ``torch.manual_seed`` also visit every GPU, 60 µs an image.)"""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


@dataclass(frozen=True)
class Unreadable:
    """An item (or batch) that could not be read: raised by :func:`batches` in the main process."""

    where: str | None
    message: str

    def error(self) -> UnrollError:
        return UnrollError(self.message, where=self.where)


class Transformed(Dataset):
    """``base``'s items through ``transform``. Keys are indices, or ``(epoch, index)`` for
    augmentation under :func:`sample_seed`; the global random state is left as it was."""

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        try:
            image, label = self.base[index]
            if epoch is None:
                return self.transform(image), label
            with seeded(sample_seed(self.seed, epoch, index)):
                return self.transform(image), label
        except UnrollError as e:
            return Unreadable(e.where, e.message)


class EpochKeys(Sampler):
    """A sampler's indices as ``(epoch, index)`` keys; ``set_epoch`` is passed on."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def collate(items: list):
    """The default collate, unless an item could not be read: then that item is the batch."""
    for item in items:
        if isinstance(item, Unreadable):
            return item
    return default_collate(items)


def default_workers(in_memory: bool) -> int:
    """Worker processes when ``--workers`` is not given: none for data already in memory (they
    would only copy it), else this process's share of the cores (torchrun's processes on this
    machine share them), at least 1 and at most 8."""
    if in_memory:
        return 0
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, share))


def train_loader(data: Transformed, micro_batch: int, rank: int, world: int, seed: int, workers: int,
                 pin_memory: bool) -> tuple[DataLoader, EpochKeys]:
    """(loader of this process's micro-batches, its sampler: call ``set_epoch`` before each epoch)."""
    order = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=(seed * ORDER_STRIDE) % (1 << 63))
    keys = EpochKeys(order)
    loader = DataLoader(data, batch_size=micro_batch, sampler=keys, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, persistent_workers=workers > 0, drop_last=True)
    return loader, keys


def eval_loader(data: Transformed, batch: int, rank: int, world: int, workers: int, pin_memory: bool) -> DataLoader:
    """Every ``world``-th item from ``rank``, in order, nothing repeated: the processes' shares add
    up to the whole split exactly once."""
    share = range(rank, len(data), world)
    return DataLoader(data, batch_size=batch, sampler=share, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0)


def batches(loader: DataLoader, limit: int | None = None) -> Iterator:
    """The loader's batches (at most ``limit``), raising an unreadable one as the error it is."""
    for number, batch in enumerate(loader):
        if limit is not None and number >= limit:
            return
        if isinstance(batch, Unreadable):
            raise batch.error()
        yield batch
