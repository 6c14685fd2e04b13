"""Multi-label CSVs: reading both formats, choosing the task, and the iteratively stratified split.

Two formats, as fastai and Kaggle/Hugging Face datasets write them:

- ``path,labels``: the labels of an image in one cell, separated by ``delim`` (default a space);
  an empty cell is a valid "nothing present" image.
- one-hot: a header ``path,<class1>,<class2>,...`` and 0/1 cells.

``--task auto`` picks multi-label when the CSV is one-hot or any row has other than one label,
and says so; a single-label CSV stays single-label.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError

DEFAULT_DELIM = " "
PATH_HEADERS = ("path", "file", "filename", "image", "image_path")
LABELS_HEADERS = ("label", "labels", "tags")
ONE_HOT_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}
LabelRows = list[tuple[str, list[str]]]  # (path, the label names of the image)


def read_label_table(path: Path, delim: str = DEFAULT_DELIM) -> tuple[LabelRows, bool]:
    """Rows ``(path, [label, ...])`` of a labels CSV, and whether it was one-hot.

    Paths are relative to the CSV's folder. Comment lines (``#``) and blank lines are skipped.
    """
    with open(path, newline="") as fh:
        lines = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row and not row[0].startswith("#")]
    if not lines:
        raise DataError(f"{path} holds no rows; expected 'path,labels' or a one-hot 'path,<class>,...' CSV")
    header = [c.strip() for c in lines[0][1]]
    has_header = header[0].lower() in PATH_HEADERS
    one_hot = has_header and len(header) >= 3 and header[1].lower() not in LABELS_HEADERS
    body = lines[1:] if has_header else lines
    merged: dict[str, set[str]] = {}  # one image listed twice gets the union of its labels, once
    for number, row in body:
        file = row[0].strip()
        full = file if os.path.isabs(file) else str(path.parent / file)
        if one_hot:
            merged.setdefault(full, set()).update(_one_hot_labels(path, number, row, header))
        else:
            if len(row) < 2:
                raise DataError(f"{path}:{number}: expected 'path,labels', got {row!r}")
            cell = row[1].strip()
            labels = [x.strip() for x in cell.split(delim)] if delim else [cell]
            merged.setdefault(full, set()).update(x for x in labels if x)
    if not merged:
        raise DataError(f"{path} holds a header but no image rows")
    return [(file, sorted(labels)) for file, labels in merged.items()], one_hot


def _one_hot_labels(path: Path, number: int, row: list[str], header: list[str]) -> list[str]:
    if len(row) != len(header):
        raise DataError(f"{path}:{number}: {len(row)} cells, but the header has {len(header)}")
    labels = []
    for name, cell in zip(header[1:], row[1:]):
        value = ONE_HOT_VALUES.get(cell.strip())
        if value is None:
            raise DataError(f"{path}:{number}: one-hot cells must be 0 or 1, got {cell!r} under {name!r}")
        if value:
            labels.append(name)
    return labels


def resolve_task(requested: str, rows: LabelRows, one_hot: bool, source: Path) -> str:
    """``single`` or ``multi`` for ``--task requested`` (auto|single|multi) on these rows."""
    multi_rows = [(p, labels) for p, labels in rows if len(labels) != 1]
    detected = "multi" if one_hot or multi_rows else "single"
    if requested == "auto":
        return detected
    if requested == "single" and detected == "multi":
        if one_hot:
            raise DataError(f"{source} is a one-hot (multi-label) CSV; use --task multi or --task auto")
        file, labels = multi_rows[0]
        raise DataError(f"{source}: {os.path.basename(file)} has {len(labels)} labels; --task single needs "
                        "exactly one per row (use --task multi, or --label-delim if label names contain "
                        "the delimiter)")
    return requested


def describe_task(task: str, requested: str, one_hot: bool, delim: str) -> str:
    """The line that tells the user which task was chosen and why."""
    if task == "single":
        return "task: single-label" + (" (auto: one label per row)" if requested == "auto" else "")
    why = ("one-hot CSV" if one_hot else f"rows with 0 or 2+ labels separated by {delim!r}; if label names "
           "contain that character, pass --task single or another --label-delim")
    return "task: multi-label" + (f" (auto: {why})" if requested == "auto" else "")


def iterative_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) of multi-hot ``targets [N, C]``: iterative stratification
    (``iterative-stratification``'s implementation of Sechidis et al. 2011), seeded.

    Afterwards every label with >= 2 images is placed in both splits where moving one image can
    do it: the algorithm balances proportions, and a rare label may still miss val.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit  # lazy: only multi-label splits

    n = len(targets)
    if n < 2 or fraction <= 0:
        return list(range(n)), []
    y = targets.numpy().astype(int)
    n_val = min(n - 1, max(1, round(n * fraction)))
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    # the package needs labels with at least one image; a column of zeros is stratified trivially
    train, val = next(splitter.split(np.zeros((n, 1)), y))
    train_set, val_set = set(int(i) for i in train), set(int(i) for i in val)
    _reach_both(y, train_set, val_set)
    return sorted(train_set), sorted(val_set)


def _reach_both(y: np.ndarray, train: set[int], val: set[int]) -> None:
    """Move single images so each label with >= 2 images is in train and in val."""
    for label in np.argsort(y.sum(0)):  # rarest first: their moves matter most
        having = np.flatnonzero(y[:, label])
        if len(having) < 2:
            continue
        in_val = [i for i in having if i in val]
        in_train = [i for i in having if i in train]
        if not in_val:  # move the train image with the fewest other labels (least disturbance)
            pick = min(in_train, key=lambda i: (y[i].sum(), i))
            train.discard(pick)
            val.add(pick)
        elif not in_train:
            pick = min(in_val, key=lambda i: (y[i].sum(), i))
            val.discard(pick)
            train.add(pick)
