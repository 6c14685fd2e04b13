"""Multi-label CSVs: reading both formats, choosing the task, and the iteratively stratified split.

Two formats, as fastai and Kaggle/Hugging Face datasets write them:

- ``path,labels``: the labels of an image in one cell, separated by ``delim`` (default a space);
  an empty cell is a valid "nothing present" image.
- one-hot: a header ``path,<class1>,<class2>,...`` and 0/1 cells.

``--task auto`` picks multi-label when the CSV is one-hot or any row has other than one label,
and says so; a single-label CSV stays single-label. What reading differs in per task (the bounds,
CSV-only data, how ``--task NAME`` reads) is its :class:`TaskData` in :data:`TASK_DATA`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from ..task import Task, get_task
from .csvfile import read_csv_rows
from .labels import MAX_CLASSES, MAX_LABEL_MATRIX, MAX_LABELS, check_class_name, per_task, shown, shown_list

DEFAULT_DELIM = " "
AUTO = "auto"  # --task auto: the task is detected from the data
PLAIN_TASK = "single"  # the task of class folders and of plain "path,label" CSVs (until detected)
# the task of a CSV of this kind whatever --task says (a plain 'path,label' CSV has none of its own)
CSV_KIND_TASK = {"one-hot": "multi", "labels": "multi"}
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


def read_label_table(path: Path, delim: str = DEFAULT_DELIM, task: str = AUTO) -> LabelTable:
    """The :class:`LabelTable` of a labels CSV; cells are split at ``delim`` (``""``: never).

    Paths are relative to the CSV's folder. Comment lines (``#``) and blank lines are skipped.
    The CSV is streamed and refused (:class:`DataError` naming the line and the remedy) as soon as
    it passes a bound, before anything is sized by it: every label must be a valid class name
    (:func:`~visiontune.data.labels.check_class_name`), and the bounds are those of the CSV's task
    (:class:`TaskData`): the task of its kind (a one-hot CSV or a ``labels`` column is multi-label),
    else ``task`` (``auto``: single-label until detected). That is at most ``MAX_CLASSES`` labels,
    and for multi-label data at most ``MAX_LABELS`` and ``MAX_LABEL_MATRIX`` images x labels. A
    ``path,labels`` header has two columns, a one-hot header distinct names.
    """
    rows = read_csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path} holds no rows; expected 'path,labels' or a one-hot 'path,<class>,...' CSV")
    header_line, cells = first
    header = [c.strip() for c in cells]
    has_header = header[0].lower() in PATH_HEADERS
    one_hot = has_header and len(header) >= 3 and header[1].lower() not in LABELS_HEADERS
    kind = ("one-hot" if one_hot else "labels" if has_header and header[1:2] and header[1].lower() in ("labels", "tags")
            else "plain")
    labels = LabelSet(path, CSV_KIND_TASK.get(kind) or (PLAIN_TASK if task == AUTO else task))
    if one_hot:
        _check_one_hot_header(path, header_line, header, labels)
    elif has_header and any(header[2:]):  # they would be ignored: a 'path,labels' CSV has one labels cell
        raise DataError(f"{path}:{header_line}: the header has columns after {header[1]!r} that would be ignored: "
                        f"{shown_list([c for c in header[2:] if c])}. Remove them, put every label of an image in the "
                        f"{header[1]!r} cell, or use a one-hot header 'path,<class1>,<class2>,...'")
    merged: dict[str, set[str]] = {}  # one image listed twice gets the union of its labels, once
    lines: dict[str, int] = {}
    for number, row in rows if has_header else itertools.chain([first], rows):
        file = row[0].strip()
        full = file if os.path.isabs(file) else str(path.parent / file)
        lines.setdefault(full, number)
        if one_hot:
            found = _one_hot_labels(path, number, row, header)
        else:
            found = [labels.add(x, number) for x in _cell_labels(path, number, row, delim) if x]
        merged.setdefault(full, set()).update(found)
        labels.check_matrix(len(merged), number)
    if not merged:
        raise DataError(f"{path} holds a header but no image rows")
    return LabelTable([(file, sorted(found)) for file, found in merged.items()], kind, lines)


# the remedy for multi-label data with too many labels
TOO_MANY_LABELS = ("multi-label training keeps a dense images x labels matrix, so drop rare labels (those on a "
                   "handful of images cannot be learnt anyway), or split the data into several CSVs (and models)")


class LabelSet:
    """The distinct labels of one CSV while it is read: each name is checked once, when first
    seen, and the bounds of ``task`` (its :class:`TaskData`) at each new label and image (see
    :func:`read_label_table`; single-label ``path,label`` lists use it too)."""

    def __init__(self, path: Path, task: str | Task):
        self.path, self.rules = path, task_data(task)
        self.names: dict[str, str] = {}  # each name maps to itself: one string object per label for all rows

    def add(self, name: str, line: int) -> str:
        """``name`` (the one object kept for it), checked and counted if new."""
        known = self.names.get(name)
        if known is not None:
            return known
        check_class_name(name, f"{self.path}:{line}: label")
        limit = self.rules.max_labels
        if len(self.names) >= limit:
            raise DataError(f"{self.path}:{line}: more than {limit} distinct labels; " + self.rules.too_many)
        self.names[name] = name
        return name

    def check_matrix(self, images: int, line: int) -> None:
        """Refuse data kept as a dense images x labels matrix (multi-label) once it would pass ``MAX_LABEL_MATRIX``."""
        if self.rules.dense:
            check_matrix(images, len(self.names), f"{self.path}:{line}")


def check_matrix(images: int, labels: int, where: str) -> None:
    """Refuse ``images`` x ``labels`` beyond the ``MAX_LABEL_MATRIX`` entries of the dense label matrix."""
    if images * labels > MAX_LABEL_MATRIX:
        raise DataError(f"{where}: {images} images x {labels} labels pass the {MAX_LABEL_MATRIX} entries of the "
                        "dense label matrix multi-label training keeps; drop rare labels, or split the data into "
                        "several CSVs (and models)")


def _check_one_hot_header(path: Path, line: int, header: list[str], labels: LabelSet) -> None:
    """The class names of a one-hot header: at most ``MAX_LABELS``, distinct, valid."""
    names = header[1:]
    if len(names) > MAX_LABELS:
        raise DataError(f"{path}:{line}: the one-hot header names {len(names)} labels, more than {MAX_LABELS}; "
                        + TOO_MANY_LABELS)
    seen: set[str] = set()
    twice = sorted({name for name in names if name in seen or seen.add(name)})
    if twice:  # their columns would silently merge into one class
        raise DataError(f"{path}:{line}: the one-hot header names {shown_list(twice)} more than once; "
                        "give each column its own class name (or merge the columns if they are one class)")
    for name in names:
        labels.add(name, line)


def _cell_labels(path: Path, number: int, row: list[str], delim: str) -> list[str]:
    """The labels in the labels cell of a ``path,labels`` row, empty ones included."""
    if len(row) < 2:
        raise DataError(f"{path}:{number}: expected 'path,labels', got {shown_list(row)}")
    extra = [c for c in row[2:] if c.strip()]
    if extra:  # an unquoted cell of comma-separated labels: they would be silently dropped
        raise DataError(f"{path}:{number}: cells after the labels cell would be ignored: "
                        f"{shown_list(extra)}. Quote a labels cell that holds commas, or separate "
                        "its labels with --label-delim (a space by default)")
    cell = row[1].strip()
    return [x.strip() for x in cell.split(delim)] if delim else [cell]


def _one_hot_labels(path: Path, number: int, row: list[str], header: list[str]) -> list[str]:
    if len(row) != len(header):
        raise DataError(f"{path}:{number}: {len(row)} cells, but the header has {len(header)}")
    labels = []
    for name, cell in zip(header[1:], row[1:]):
        value = ONE_HOT_VALUES.get(cell.strip())
        if value is None:
            raise DataError(f"{path}:{number}: one-hot cells must be 0 or 1, got {shown(cell)} under {shown(name)}")
        if value:
            labels.append(name)
    return labels


def check_label_bounds(table: LabelTable, source: Path, task: str | Task) -> None:
    """The bounds of ``task`` (its :class:`TaskData`) on a table read before the task was known:
    a plain ``path,label`` CSV that ``--task auto`` found multi-label is held to ``MAX_LABELS`` and
    ``MAX_LABEL_MATRIX``."""
    rules = task_data(task)
    count = len({label for _, labels in table.rows for label in labels})
    if count > rules.max_labels:
        raise DataError(f"{source} has {count} distinct labels, more than {rules.max_labels}; " + rules.too_many)
    if rules.dense:
        check_matrix(len(table.rows), count, str(source))


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


def _read_single(csvs: list[Path], delim: str) -> list[LabelTable]:
    """``--task single``: each CSV checked as single-label (a cell is one label, spaces and all);
    no tables, as single-label discovery reads its ``path,label`` lists itself."""
    for source in csvs:
        check_single(read_label_table(source, delim="", task="single"), source)
    return []


def _read_multi(csvs: list[Path], delim: str) -> list[LabelTable]:
    """``--task multi``: each CSV's table under the multi-label bounds."""
    return [read_label_table(source, delim, "multi") for source in csvs]


@dataclass(frozen=True)
class TaskData:
    """What reading one task's labels differs in (see :func:`task_data`).

    Attributes:
        max_labels: the distinct labels one data set may hold.
        too_many: the remedy a message names when it holds more.
        dense: labels are kept as a dense images x labels matrix, bounded by ``MAX_LABEL_MATRIX``.
        csv_only: the task's data comes only as CSVs, never as class folders (its val data too).
        read: the labels CSVs as ``--task NAME`` reads them, with no detection: their tables (none
            when the task's discovery reads its CSVs again itself).
    """

    max_labels: int
    too_many: str
    dense: bool
    csv_only: bool
    read: Callable[[list[Path], str], list[LabelTable]]


#: The data layer's reading rules of each task, by :attr:`Task.name <visiontune.task.Task.name>`.
TASK_DATA = {"single": TaskData(MAX_CLASSES, "merge or drop rare classes, or split the data", dense=False,
                                csv_only=False, read=_read_single),
             "multi": TaskData(MAX_LABELS, TOO_MANY_LABELS, dense=True, csv_only=True, read=_read_multi)}


def task_data(task: str | Task) -> TaskData:
    """The :class:`TaskData` of ``task`` (a task or its name); KeyError lists the tasks that have one."""
    return per_task(TASK_DATA, task, "data reading rules")


def choose_task(data: Path, val: Path | None, requested: str, delim: str
                ) -> tuple[str, str, list[LabelTable]]:
    """(task name, why, the label tables of ``data`` and ``val``) for ``--task requested`` (``auto``
    or a task's name); folders are single-label, and a multi-label training CSV needs a CSV for
    ``val`` too."""
    forced = None if requested == AUTO else task_data(requested)  # --task NAME: read as told
    if not data.is_file():
        if forced is not None and forced.csv_only:
            raise DataError(f"{get_task(requested).title} data comes as a CSV of 'path,labels' or one-hot rows; "
                            f"{data} is a folder")
        return PLAIN_TASK, "", []
    csvs = [data] + ([val] if val is not None and val.is_file() else [])
    if forced is not None:
        task, why, tables = requested, "", forced.read(csvs, delim)
    else:
        tables = [read_label_table(source, delim, requested) for source in csvs]
        task, why = detect_task(tables, delim)
    rules = task_data(task)
    if rules.csv_only and val is not None and not val.is_file():
        raise DataError(f"{get_task(task).title} validation data must be a CSV too; {val} is a folder")
    for table, source in zip(tables, csvs):  # a plain CSV was read under the single-label bounds
        check_label_bounds(table, source, task)
    return task, why, tables


def describe_task(task: str | Task, requested: str, why: str) -> str:
    """The line that tells the user which task was chosen and why."""
    return f"task: {get_task(task).title}" + (f" (auto: {why})" if requested == AUTO else "")


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
    do it without taking another label's last image from the side it leaves or emptying a split.

    Each side's images per label are counted once and updated on each move, and only a label
    missing from a side looks at its images: linear in the size of ``y`` (recounting a side for
    every label made it quadratic in the labels).
    """
    total = y.sum(0)
    # (images, their count per label) of each side, kept up to date as images move
    sides = [(train, y[sorted(train)].sum(0)), (val, y[sorted(val)].sum(0))]
    labels_of: dict[int, np.ndarray] = {}  # the labels of the images looked at, computed once each
    for _ in range(3):  # a move can enable another; three rounds settle every case seen
        moved = False
        for label in np.argsort(total, kind="stable"):  # rarest first: their moves matter most
            if total[label] < 2:
                continue
            for (source, left), (target, reached) in (sides, sides[::-1]):  # train to val, then val to train
                if reached[label] or len(source) < 2:
                    continue
                candidates = []
                for i in map(int, np.flatnonzero(y[:, label])):
                    if i in source:
                        if i not in labels_of:
                            labels_of[i] = np.flatnonzero(y[i])
                        # safe: every other label of the image keeps an image on the side it leaves
                        if all(left[c] >= 2 or total[c] < 2 for c in labels_of[i] if c != label):
                            candidates.append(i)
                if candidates:
                    pick = min(candidates, key=lambda i: (len(labels_of[i]), i))
                    source.discard(pick)
                    target.add(pick)
                    left -= y[pick]
                    reached += y[pick]
                    moved = True
        if not moved:
            return
