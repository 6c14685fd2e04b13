"""Torch datasets over image files, and the one policy for images that cannot be read.

Bad images, everywhere:

- Every labelled dataset is scanned before use (:func:`visiontune.data.scan.discover`):
  unreadable files are skipped, counted and listed, never discovered mid-epoch.
- Training (:class:`ImageListDataset`): a file that turns bad *after* the scan (changed on disk
  during the run) is replaced by the next readable sample and logged. An epoch must keep its
  length and its batches their shape, and a resumed run must see the same number of batches.
  Images decoded into memory (:mod:`visiontune.data.memory`) are read once: one unreadable then
  is left out of the run from the start, which keeps the epoch length constant just as well.
- Inference (:class:`InputDataset`: predict, evaluate, calibration, feature extraction): the
  input yields its error instead of a tensor. Predict writes an error row, evaluation and
  calibration leave it out and count it, feature extraction leaves it out of the training set
  and never caches anything for it. A substitute image there would be a wrong answer.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..core.errors import ImageDecodeError
from ..core.hardware import cpu_count
from .image import load_image
from .labels import Label
from .sampling import SampleKey, sample_seed, seeded
from .scan import Sample

log = logging.getLogger(__name__)
MAX_SUBSTITUTE_TRIES = 16


class ImageListDataset(Dataset):
    """``(path, label)`` samples decoded with :func:`load_image` and transformed (training).

    Indexed by an int, or by an ``(index, epoch)`` key from :class:`~visiontune.data.sampling.EpochSampler`:
    then the random augmentation is seeded from ``(seed, epoch, index)``, reproducible on resume.
    """

    def __init__(self, samples: list[Sample], transform: Callable, draft_size: int | None = None, seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, Label]:
        if isinstance(key, tuple):
            index, epoch = key
            with seeded(sample_seed(self.seed, epoch, index)):
                return self._get(index)
        return self._get(key)

    def _get(self, index: int) -> tuple[torch.Tensor, Label]:
        for attempt in range(MAX_SUBSTITUTE_TRIES):
            position = (index + attempt) % len(self.samples)
            path, label = self.samples[position]
            try:
                return self.transform(load_image(path, self.draft_size)), label
            except ImageDecodeError as exc:
                log.warning("skipping %s mid-run: %s", path, exc)
        raise RuntimeError(f"{MAX_SUBSTITUTE_TRIES} consecutive unreadable files near index {index}")


class InputDataset(Dataset):
    """Inputs for inference (paths, PIL images or encoded bytes): ``index -> (index, tensor | None, error)``."""

    def __init__(self, inputs: Sequence[Any], transform: Callable[[Image.Image], torch.Tensor],
                 draft_size: int | None = None):
        self.inputs = inputs
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.inputs)

    def transform_item(self, index: int, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform_item(index, load_image(self.inputs[index], self.draft_size)), ""
        except ImageDecodeError as exc:
            return index, None, str(exc)


def collate_inputs(batch: list[tuple[int, torch.Tensor | None, str]]
                   ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(indices of the readable inputs, their stacked tensors or None, [(index, error)])."""
    good = [(i, t) for i, t, _ in batch if t is not None]
    errors = [(i, e) for i, t, e in batch if t is None]
    tensor = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensor, errors


def input_loader(dataset: InputDataset, batch_size: int, workers: int | None = None) -> DataLoader:
    """Batches of :func:`collate_inputs`, in input order; no worker processes for a short or
    in-memory input list (starting them would cost more than they save)."""
    in_memory = any(not isinstance(x, (str, os.PathLike)) for x in dataset.inputs)
    n_workers = 0 if in_memory or len(dataset) < 2 * batch_size else default_workers(workers)
    return DataLoader(dataset, batch_size=batch_size, num_workers=n_workers, collate_fn=collate_inputs,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def default_workers(requested: int | None = None) -> int:
    """Data-loading processes: as asked, else one per core up to 8 (0 on single-core machines)."""
    if requested is not None:
        return max(0, requested)
    cores = cpu_count()
    return 0 if cores <= 1 else min(8, cores)


def _worker_init(worker_id: int) -> None:
    """Seed like Lightning does, and leave SIGINT/SIGTERM to the main process.

    The main process checkpoints and shuts the workers down itself; a worker dying of the same
    signal first would turn a clean stop into a crash.
    """
    # lazy: Lightning is only loaded by training, which is when loader workers start
    from lightning.fabric.utilities.seed import pl_worker_init_function

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pl_worker_init_function(worker_id)


def make_loader(dataset: Dataset, batch_size: int, workers: int, seed: int = 0, sampler=None,
                collate_fn=None, loader: Callable[..., DataLoader] = DataLoader) -> DataLoader:
    """A seeded training/validation loader in ``sampler`` order (dataset order when None).

    Shuffling and class balancing live in :class:`~visiontune.data.sampling.EpochSampler`, so a
    resumed run repeats them exactly. ``loader``: the class (or a partial of it) to build, a
    :class:`~torch.utils.data.DataLoader` or a subclass (training's checkpoints its position).
    """
    generator = torch.Generator().manual_seed(seed)
    return loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        drop_last=False,
        worker_init_fn=_worker_init if workers > 0 else None,
        collate_fn=collate_fn,
    )
