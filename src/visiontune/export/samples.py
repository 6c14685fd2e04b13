"""The images an export is checked and measured on: the model's own labelled data, or generated ones.

A model folder from someone else names whatever data path its author chose, so that path is used
only for this user's own runs (:func:`resolve_data_path`); images are decoded exactly as
prediction decodes them, and unreadable ones are skipped (:func:`visiontune.data.image.readable`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import ExportError
from ..core.layout import RunLayout
from ..data.image import readable
from ..data.preprocess import Preprocessing
from ..data.scan import discover, discover_eval, read_split_csv
from ..data.transforms import eval_transform
from ..models.card import ModelCard


def resolve_data_path(card: ModelCard) -> Path | None:
    """The training data the card records, only when it is this user's own run's, else None.

    A model folder from someone else names whatever path its author chose (``.``, ``~``...), and
    walking it would read and decode that tree. So the path is used only when the model folder
    still sits in the run folder that training recorded (``training.run_dir``, a real path no
    stranger can match), and it is a folder or CSV that exists and belongs to the current user
    (relative paths: cwd, then the run folder).
    """
    data = card.training.get("data")
    if not data or not isinstance(data, str) or card.model_dir is None:
        return None
    run = RunLayout.of_model_dir(card.model_dir).root
    if card.training.get("run_dir") != os.path.realpath(run):
        return None
    candidates = [Path(data)] if Path(data).is_absolute() else [Path(data), run / data]
    for path in candidates:
        try:
            owned = path.stat().st_uid == os.getuid() if hasattr(os, "getuid") else True
        except OSError:
            continue
        if owned and (path.is_dir() or (path.is_file() and path.suffix.lower() == ".csv")):
            return path
    return None


def labelled_samples(card: ModelCard, data: str | os.PathLike | None = None,
                     split: str = "val") -> list[tuple[str, int]]:
    """Labelled images for parity/accuracy: ``data`` (evaluation layout) or the model's own split.

    Without ``data`` the run's own ``splits/<split>.csv`` is read, so ``val`` is exactly the
    held-out set the model never trained on (whatever ``--val``/``--val-fraction`` training used).
    A model folder without split CSVs, still in the run folder training wrote, re-splits the
    recorded training data with the recorded seed and fraction instead (:func:`resolve_data_path`);
    any other gives ``[]`` (callers ask for ``--data``).
    """
    if data is not None:
        return discover_eval(data, card.class_names, card.task.name, str(card.training.get("label_delim", " ")))[0]
    if card.model_dir is not None:
        split_csv = RunLayout.of_model_dir(card.model_dir).split_csv(split)
        if split_csv.is_file():
            return read_split_csv(split_csv, card.class_names)
    source = resolve_data_path(card)
    if source is None:
        return []
    training = card.training
    splits = discover(source, training.get("val"), float(training.get("val_fraction", 0.2)),
                      seed=int(training.get("seed", 0)), class_names=card.class_names, task=card.task.name,
                      label_delim=str(training.get("label_delim", " ")))
    return list(getattr(splits, split)) or list(splits.val)


def generated_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic synthetic photos (noise + shapes) for parity when no real data is at hand."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        arr[y0:y0 + size // 2, x0:x0 + size // 2] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(arr))
    return images


def eval_batch(inputs: Sequence[str | Image.Image], pre: Preprocessing) -> torch.Tensor:
    """Decode and transform images exactly as prediction does; unreadable ones are dropped."""
    transform, draft = eval_transform(pre), pre.draft_size()
    tensors = [transform(image) for _, image in readable(inputs, draft_size=draft)]
    if not tensors:
        raise ExportError("no readable images to check the export with")
    return torch.stack(tensors)


def parity_batch(card: ModelCard, data: str | os.PathLike | None = None,
                 limit: int = 64) -> tuple[torch.Tensor, str]:
    """A preprocessed batch of validation images (or generated ones) and where it came from."""
    samples = labelled_samples(card, data)
    if samples:
        step = max(1, len(samples) // limit)  # spread over classes rather than the first folder only
        paths = [p for p, _ in samples[::step][:limit]]
        return eval_batch(paths, card.preprocessing), f"{len(paths)} validation images"
    pre = card.preprocessing
    images = generated_images(min(limit, 32), max(pre.height, pre.width) * 2)
    return eval_batch(images, pre), f"{len(images)} generated images"


def file_size_mb(path: str | os.PathLike) -> float:
    path = Path(path)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total / 1e6
