"""Torch datasets over labelled file lists; a file that turns bad mid-run never kills an epoch."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .image import ImageDecodeError, load_image
from .sampling import SampleKey, sample_seed, seeded
from .scan import Sample

log = logging.getLogger(__name__)
MAX_SUBSTITUTE_TRIES = 16


class ImageListDataset(Dataset):
    """``(path, label)`` samples decoded with :func:`load_image` and transformed.

    The integrity scan runs before training, so a failure here means a file changed on disk
    since; the sample is replaced by the next readable one and the failure is logged.

    Indexed by an int, or by an ``(index, epoch)`` key from :class:`~visiontune.data.sampling.EpochSampler`:
    then the random augmentation is seeded from ``(seed, epoch, index)``, reproducible on resume.
    """

    def __init__(self, samples: list[Sample], transform: Callable, draft_size: int | None = None, seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size
        self.seed = seed
        self._images: list[np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def preload(self, shorter_side: int, threads: int = 8) -> int:
        """Decode every image once, downscaled to ``shorter_side`` (the resize step's target),
        and keep the pixels in memory; returns the bytes held.

        Filled before the loader's workers fork, the arrays are shared with them copy-on-write,
        so later epochs skip file reads and JPEG decoding entirely.
        """

        def decode(path: str) -> np.ndarray | None:
            try:
                img = load_image(path, self.draft_size)
            except (ImageDecodeError, OSError):
                return None  # __getitem__ retries the file and substitutes if still bad
            scale = shorter_side / min(img.size)
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.Resampling.BICUBIC)
            return np.asarray(img)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            self._images = list(pool.map(decode, [p for p, _ in self.samples]))
        return sum(a.nbytes for a in self._images if a is not None)

    def _image(self, index: int, path: str) -> Image.Image:
        if self._images is not None and self._images[index] is not None:
            return Image.fromarray(self._images[index])
        return load_image(path, self.draft_size)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = key
            with seeded(sample_seed(self.seed, epoch, index)):
                return self._get(index)
        return self._get(key)

    def _get(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(MAX_SUBSTITUTE_TRIES):
            position = (index + attempt) % len(self.samples)
            path, label = self.samples[position]
            try:
                return self.transform(self._image(position, path)), label
            except (ImageDecodeError, OSError) as exc:
                log.warning("skipping %s mid-run: %s", path, exc)
        raise RuntimeError(f"{MAX_SUBSTITUTE_TRIES} consecutive unreadable files near index {index}")


def default_workers(requested: int | None = None) -> int:
    """Data-loading processes: as asked, else one per core up to 8 (0 on single-core machines)."""
    if requested is not None:
        return max(0, requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 1 else min(8, cores)


def _worker_init(worker_id: int) -> None:
    """Seed like Lightning does, and leave SIGINT/SIGTERM to the main process.

    The main process checkpoints and shuts the workers down itself; a worker dying of the same
    signal first would turn a clean stop into a crash.
    """
    import signal

    from lightning.fabric.utilities.seed import pl_worker_init_function

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pl_worker_init_function(worker_id)


def make_loader(dataset: Dataset, batch_size: int, workers: int, seed: int = 0, sampler=None) -> DataLoader:
    """A seeded loader in ``sampler`` order (indices or a Sampler; dataset order when None).

    Shuffling and class balancing live in :class:`~visiontune.data.sampling.EpochSampler`, so a
    resumed run repeats them exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        drop_last=False,
        worker_init_fn=_worker_init if workers > 0 else None,
    )
