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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError

DEFAULT_DELIM = " "
PATH_HEADERS = ("path", "file", "filename", "image", "image_path")
LABELS_HEADERS = ("label", "labels", "tags")
ONE_HOT_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}
LabelRows = list[tuple[str, list[str]]]  # (path, the label names of the image)


@dataclass
class LabelTable:
    """A labels CSV as read: one row per image (an image listed twice gets the union of its
    labels), the kind of CSV (``one-hot``; ``labels``: a ``labels``/``tags`` column; ``plain``:
    ``path,label`` or no header) and the CSV line of each image, for messages."""

    rows: LabelRows
    kind: str
    lines: dict[str, int] = field(default_factory=dict)


def read_label_table(path: Path, delim: str = DEFAULT_DELIM) -> LabelTable:
    """The :class:`LabelTable` of a labels CSV; cells are split at ``delim`` (``""``: never).

    Paths are relative to the CSV's folder. Comment lines (``#``) and blank lines are skipped.
    """
    with open(path, newline="") as fh:
        lines = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row and not row[0].startswith("#")]
    if not lines:
        raise DataError(f"{path} holds no rows; expected 'path,labels' or a one-hot 'path,<class>,...' CSV")
    header = [c.strip() for c in lines[0][1]]
    has_header = header[0].lower() in PATH_HEADERS
    one_hot = has_header and len(header) >= 3 and header[1].lower() not in LABELS_HEADERS
    kind = ("one-hot" if one_hot else "labels" if has_header and header[1:2] and header[1].lower() in ("labels", "tags")
            else "plain")
    body = lines[1:] if has_header else lines
    merged: dict[str, set[str]] = {}  # one image listed twice gets the union of its labels, once
    first: dict[str, int] = {}
    for number, row in body:
        file = row[0].strip()
        full = file if os.path.isabs(file) else str(path.parent / file)
        first.setdefault(full, number)
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
    return LabelTable([(file, sorted(labels)) for file, labels in merged.items()], kind, first)


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


def detect_task(tables: list[LabelTable], delim: str) -> tuple[str, str]:
    """(``single`` or ``multi``, why) for ``--task auto``.

    Multi-label: a one-hot CSV, a ``labels``/``tags`` column, an image with no label, or cells of
    several labels that each also label an image alone (``cat dog`` beside ``cat`` and ``dog``).
    A cell such as ``golden retriever`` whose parts never stand alone stays one class name.
    """
    rows = [row for t in tables for row in t.rows]
    if any(t.kind == "one-hot" for t in tables):
        return "multi", "one-hot CSV"
    if any(t.kind == "labels" for t in tables):
        return "multi", f"a 'labels' column, labels separated by {delim!r}"
    if any(not labels for _, labels in rows):
        return "multi", "images with no label"
    several = [labels for _, labels in rows if len(labels) > 1]
    alone = {labels[0] for _, labels in rows if len(labels) == 1}
    if several and all(x in alone for labels in several for x in labels):
        return "multi", f"cells of several labels separated by {delim!r}, each also found alone"
    if several:
        return "single", (f"cells with {delim!r} read as one class name, e.g. {delim.join(several[0])!r}; "
                          "pass --task multi to split them")
    return "single", "one label per row"


def check_single(table: LabelTable, source: Path) -> None:
    """``--task single``: refuse a one-hot CSV and rows without a label, naming the line."""
    if table.kind == "one-hot":
        raise DataError(f"{source} is a one-hot (multi-label) CSV; use --task multi or --task auto")
    for file, labels in table.rows:
        if not labels:
            raise DataError(f"{source}:{table.lines.get(file, '?')}: {os.path.basename(file)} has no label; "
                            "--task single needs one per row (use --task multi for images with no label)")


def choose_task(data: Path, val: Path | None, requested: str, delim: str
                ) -> tuple[str, str, list[LabelTable]]:
    """(task, why, the label tables of ``data`` and ``val``) for ``--task requested``; folders are
    single-label, and a multi-label training CSV needs a CSV for ``val`` too."""
    if not data.is_file():
        if requested == "multi":
            raise DataError(f"multi-label data comes as a CSV of 'path,labels' or one-hot rows; {data} is a folder")
        return "single", "", []
    csvs = [data] + ([val] if val is not None and val.is_file() else [])
    if requested == "single":
        for source in csvs:  # a cell is one label, spaces and all
            check_single(read_label_table(source, delim=""), source)
        return "single", "", []
    tables = [read_label_table(source, delim) for source in csvs]
    task, why = ("multi", "") if requested == "multi" else detect_task(tables, delim)
    if task == "multi" and val is not None and not val.is_file():
        raise DataError(f"multi-label validation data must be a CSV too; {val} is a folder")
    return task, why, tables


def describe_task(task: str, requested: str, why: str) -> str:
    """The line that tells the user which task was chosen and why."""
    name = "multi-label" if task == "multi" else "single-label"
    return f"task: {name}" + (f" (auto: {why})" if requested == "auto" else "")


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
    """Move single images so each label with >= 2 images is in train and in val, where a move can
    do it without taking another label's last image from the side it leaves or emptying a split."""
    total = y.sum(0)
    for _ in range(3):  # a move can enable another; three rounds settle every case seen
        moved = False
        for label in np.argsort(total, kind="stable"):  # rarest first: their moves matter most
            if total[label] < 2:
                continue
            for source, target in ((train, val), (val, train)):
                if any(y[i, label] for i in target) or len(source) < 2:
                    continue
                side = y[sorted(source)].sum(0)
                # safe: every other label of the image keeps an image on the side it leaves
                candidates = [i for i in source if y[i, label]
                              and all(side[c] >= 2 or total[c] < 2 for c in np.flatnonzero(y[i]) if c != label)]
                if candidates:
                    pick = min(candidates, key=lambda i: (y[i].sum(), i))
                    source.discard(pick)
                    target.add(pick)
                    moved = True
        if not moved:
            return
