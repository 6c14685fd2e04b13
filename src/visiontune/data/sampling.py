"""Resumable, reproducible training order and augmentation.

A resumed run must draw the same batches and the same augmentations as an uninterrupted one.
PyTorch's samplers and loader workers keep that randomness in RNG state that no checkpoint
holds (the loader's generator, each persistent worker's seed). Here everything derives from
``(seed, epoch, index)`` instead: :class:`EpochSampler` orders each epoch from ``seed`` and
``epoch`` alone and yields ``(index, epoch)`` keys, and the dataset seeds each sample's
augmentation from its key (:func:`seeded`). As a bonus the result no longer depends on the
number of loader workers.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

SampleKey = tuple[int, int]  # (index, epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (distinct for every triple in practice)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch, ``random`` and numpy for one sample's transform.

    In a loader worker the state can simply be overwritten; in the main process (``workers=0``)
    the previous state is restored afterwards, so dropout and friends are not disturbed.
    """
    in_main = get_worker_info() is None
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if in_main else None
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class EpochSampler(Sampler[SampleKey]):
    """Each epoch's order from ``(seed, epoch)`` only: shuffled, or class-balanced draws.

    Sharded like :class:`torch.utils.data.DistributedSampler`: the order is padded with its own
    first indices to a multiple of ``world`` and rank ``r`` takes every ``world``-th item, so
    every sample is seen once per epoch across ranks. Lightning calls :meth:`set_epoch`.

    Example:
        >>> s = EpochSampler(5, seed=0); s.set_epoch(1); sorted(i for i, _ in s)
        [0, 1, 2, 3, 4]
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 weights: torch.Tensor | None = None, shuffle: bool = True,
                 epoch_fn: Callable[[], int | None] | None = None):
        self.size, self.seed, self.rank, self.world = size, seed, rank, max(1, world)
        self.weights, self.shuffle = weights, shuffle
        self.epoch = 0
        # Lightning's set_epoch comes too late when a resumed fit builds its first iterator, so the
        # trainer's epoch counter, when given, is read at the moment an epoch's iterator starts
        self.epoch_fn = epoch_fn
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, items: int) -> None:
        """Make the next iteration epoch ``epoch``'s, after the first ``items`` of this rank's shard
        (the samples of the batches a mid-epoch checkpoint had trained on). The epoch is the
        checkpoint's: a loader's first iterator after a restore may be made before Lightning's
        epoch counter has moved past a completed epoch."""
        self._resume = (int(epoch), int(items))

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def order(self) -> list[int]:
        """This epoch's full (unsharded, padded) order."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 & 0xFFFFFFFF))
        if self.weights is not None:  # class-balanced: draw with replacement by weight
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        padding = len(self) * self.world - len(order)
        return order + (order * (padding // max(1, len(order)) + 1))[:padding]

    def __iter__(self) -> Iterator[SampleKey]:
        current = self.epoch_fn() if self.epoch_fn is not None else None
        if current is not None:
            self.epoch = int(current)
        skip = 0
        if self._resume is not None:
            self.epoch, skip = self._resume
            self._resume = None
        return iter([(index, self.epoch) for index in self.order()[self.rank::self.world][skip:]])
