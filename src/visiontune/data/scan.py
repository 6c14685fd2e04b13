"""Find the labelled images of a dataset and split them.

Accepted layouts (detected automatically):

- ``DATA/<class>/**/*.jpg``                      -> stratified, seeded train/val split
- ``DATA/{train,val[,test]}/<class>/**/*.jpg``   -> the given splits
- ``DATA.csv`` with ``path,label`` rows          -> paths relative to the CSV
- ``DATA.csv`` with ``path,labels`` rows (labels separated by ``label_delim``, none allowed)
  or one-hot ``path,<class1>,<class2>,...`` rows of 0/1  -> multi-label data, iteratively
  stratified train/val split (Sechidis et al. 2011) so that rare labels reach val

Every candidate file is decoded once in a fast parallel scan; files that cannot be read are
skipped and reported, never discovered mid-epoch. How each task's images are found, split,
evaluated and written down is its :class:`TaskScan` in :data:`TASK_SCANS`.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..core.errors import DataError, ImageDecodeError
from ..core.safe_io import atomic_writer
from ..task import Task, get_task
from .csvfile import read_csv_rows
from .image import is_image_path, load_image
from .label_studio import as_csv, is_export
from .label_tables import (
    AUTO,
    DEFAULT_DELIM,
    PLAIN_TASK,
    LabelRows,
    LabelSet,
    LabelTable,
    choose_task,
    describe_task,
    iterative_split,
    read_label_table,
)
from .labels import Label, check_class_names, multi_hot, per_task, shown_list, task_of
from .preprocess import open_image

Sample = tuple[str, Label]  # (path, class index) or (path, multi-hot [C]); see data/labels.py

SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test",)}
SCAN_DRAFT_SIZE = 64
HEADERS = {(p, c) for p in ("path", "file", "filename", "image") for c in ("label", "labels")}  # optional header


@dataclass
class Splits:
    """Labelled file lists of one dataset, with the files that were skipped and why."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str = "folders"
    task: Task = field(default_factory=lambda: get_task("single"))  # what the labels are (visiontune.task)
    task_note: str = ""  # which task was chosen and why (for CSVs, where it is a choice)
    val_fraction: float | None = None  # the share a split held out (None: the data had its own val split)
    outside_root: list[str] = field(default_factory=list)  # files resolving outside the data's folder

    def outside_warning(self, limit: int = 3) -> str:
        """A warning naming files that resolve outside the data folder ('' when none do)."""
        if not self.outside_root:
            return ""
        return (f"warning: {len(self.outside_root)} file(s) resolve outside the data folder (symlinks, or absolute "
                f"or '..' paths in a CSV), e.g. {', '.join(self.outside_root[:limit])}; they are used as listed. "
                "Check that you meant to include them")

    def counts(self, split: str) -> dict[str, int]:
        """Images per class (a multi-label image counts for each of its classes)."""
        counts = self.task.counts([y for _, y in getattr(self, split)], len(self.class_names))
        return {name: int(counts[i]) for i, name in enumerate(self.class_names)}


def list_class_folder(root: Path) -> dict[str, list[str]]:
    """Map class name -> image paths for ``root/<class>/**``; hidden entries are ignored."""
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    classes: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            classes[entry.name] = sorted(_walk_images(entry))
    if not classes:
        raise DataError(
            f"no class folders in {root}; expected {root}/<class>/*.jpg or {root}/train/<class>/*.jpg"
        )
    check_class_names(list(classes), f"{root}: class folder")  # as model.json will need them, before training
    return classes


def _walk_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and is_image_path(f))
    return found


def read_csv_list(path: Path) -> dict[str, list[str]]:
    """Read ``path,label`` rows (header optional); paths are relative to the CSV's folder.

    Streamed, and refused (:class:`DataError` naming the line) at the first label that is not a
    valid class name, past ``MAX_CLASSES`` classes, or at a cell that would be ignored.
    """
    classes: dict[str, list[str]] = {}
    names = LabelSet(path, PLAIN_TASK)
    for index, (line, row) in enumerate(read_csv_rows(path)):
        if len(row) < 2:
            raise DataError(f"{path}:{line}: expected 'path,label', got {shown_list(row)}")
        file, label = row[0].strip(), row[1].strip()
        extra = [c for c in row[2:] if c.strip()]
        if index == 0 and (file.lower(), label.lower()) in HEADERS:
            if extra:
                raise DataError(f"{path}:{line}: the header has columns after {row[1]!r} that would be ignored: "
                                f"{shown_list(extra)}; a 'path,label' CSV has two columns")
            continue
        if extra:
            raise DataError(f"{path}:{line}: cells after the label would be ignored: {shown_list(extra)}; "
                            "a 'path,label' CSV has two columns (quote a cell that holds a comma)")
        if label not in classes:  # checked and counted once, before the rest of the file is read
            names.add(label, line)
        full = file if os.path.isabs(file) else str(path.parent / file)
        classes.setdefault(label, []).append(full)
    if not classes:
        raise DataError(f"{path} holds no 'path,label' rows")
    return dict(sorted(classes.items()))


def find_split_dirs(root: Path) -> dict[str, Path]:
    """Return {'train': dir, 'val': dir, 'test': dir} for a split layout, or {} for class folders."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    names = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in names:
                found[split] = names[alias]
                break
    return found if "train" in found else {}


def scan_files(paths: list[str], workers: int | None = None) -> dict[str, ImageDecodeError]:
    """Decode every file once (reduced-size JPEG decode); return ``{path: error}`` for bad ones.

    A missing file is an error of kind ``missing``; see :class:`ImageDecodeError` for the others.
    """
    workers = workers or min(8, (os.cpu_count() or 1) * 2)

    def check(path: str) -> tuple[str, ImageDecodeError | None]:
        if not os.path.isfile(path):
            return path, ImageDecodeError("file not found", kind="missing")
        try:
            load_image(path, draft_size=SCAN_DRAFT_SIZE)
            return path, None
        except ImageDecodeError as exc:
            return path, exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {p: error for p, error in pool.map(check, paths) if error is not None}


def median_side(paths: list[str], sample: int = 200) -> int:
    """The median shorter side of the images (from the headers of up to ``sample`` of them)."""
    sides = []
    for path in paths[::max(1, len(paths) // sample)]:
        try:
            with open_image(path) as img:
                sides.append(min(img.size))
        except Exception:  # unreadable files were skipped by the scan
            continue
    return int(sorted(sides)[len(sides) // 2]) if sides else 0


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded per-class split: each class with >= 2 images gives at least one to val."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    rng = random.Random(seed)
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return sorted(train), sorted(val)


def require_data(data: str | os.PathLike) -> Path:
    """``data`` as a path, or a :class:`DataError` when nothing is there (checked before any slow step).
    A Label Studio JSON export becomes the CSV of its annotated tasks (:mod:`.label_studio`)."""
    path = Path(data)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    return as_csv(path) if is_export(path) else path  # a Label Studio export: read as the CSV it becomes


# A split's held-out share is capped at this many images (or this many per class, where that is more) unless
# the user gives the share: beyond it a validation pass costs time each epoch (and at the finish: --tta auto,
# calibration, the unknown-score's threshold) and keeps images from training, for little more certainty (the
# standard error of an accuracy of 0.9 on 5,000 images is 0.4 points). On CIFAR-10's 40,000 images in 15 minutes
# the share of 0.2 held out 8,000 (18.6 s a pass at 96 px); see bench/RESULTS.md "Overheads of a budgeted run"
MAX_HELD_OUT = 5000
MIN_HELD_OUT_PER_CLASS = 50


def held_out_fraction(fraction: float, n: int, num_classes: int, cap: bool = True) -> float:
    """The share of ``n`` images of ``num_classes`` classes a split holds out for validation:
    ``fraction``, at most :data:`MAX_HELD_OUT` images (or :data:`MIN_HELD_OUT_PER_CLASS` per class,
    where that is more) when ``cap``. Splitting again with the returned share gives the same split.

    Example:
        >>> held_out_fraction(0.2, 1000, 2), held_out_fraction(0.2, 40000, 10)
        (0.2, 0.125)
        >>> held_out_fraction(0.2, 40000, 10, cap=False), held_out_fraction(0.2, 400000, 1000)
        (0.2, 0.125)
    """
    if not cap or n * fraction <= MAX_HELD_OUT:
        return fraction
    return min(fraction, max(MAX_HELD_OUT, MIN_HELD_OUT_PER_CLASS * num_classes) / n)


def discover(
    data: str | Path,
    val: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_names: list[str] | None = None,
    scan: bool = True,
    task: str = AUTO,
    label_delim: str = DEFAULT_DELIM,
    cap_val: bool = False,
) -> Splits:
    """Find, check and split the images of a dataset.

    Args:
        data: folder (class folders or train/val[/test] layout) or CSV of ``path,label``,
            ``path,labels`` or one-hot rows.
        val: explicit validation folder/CSV; overrides the split found in ``data``.
        val_fraction: share of each class held out when no validation set is given.
        seed: seed of the stratified split.
        class_names: expected classes (e.g. a trained model's); the data must match them.
        scan: decode every file first and skip unreadable ones.
        task: ``auto`` (multi-label for a one-hot CSV or rows with other than one label),
            ``single`` or ``multi``.
        label_delim: separator of the labels in one cell of a ``path,labels`` CSV.
        cap_val: hold out at most :func:`held_out_fraction`'s images (``splits.val_fraction`` says
            the share held out: what splits the data the same way again).

    Example:
        splits = discover("data/hymenoptera/train")
        splits.class_names, splits.task
        # -> (['ants', 'bees'], SingleLabel())
    """
    data, val = require_data(data), require_data(val) if val else None
    chosen, why, tables = choose_task(data, val, task, label_delim)
    found = get_task(chosen)
    held_out = partial(held_out_fraction, val_fraction, cap=cap_val)
    splits = task_scan(found).discover(found, data, val, tables, held_out, seed, class_names, scan)
    splits.task_note = describe_task(found, task, why) if data.is_file() else ""  # for CSVs, where it is a choice
    return splits


def _discover_single(task: Task, data: Path, val: Path | None, tables: list[LabelTable],
                     held_out: Callable[[int, int], float], seed: int,
                     class_names: list[str] | None, scan: bool) -> Splits:
    """The single-label part of :func:`discover`: class folders, or ``path,label`` CSVs read again as such."""
    raw = read_source(data, val)
    names = sorted(raw["train"])
    if class_names is None and len(names) < 2:  # one class trains to a meaningless "val accuracy 1.0"
        raise DataError(f"{data} has one class ({names[0]!r}); a classifier needs at least 2. Add a folder (or CSV "
                        "label) of images for another class, e.g. 'other'")
    _check_classes(raw, names, class_names)
    names = class_names or names
    skipped: dict[str, str] = {}
    if scan:
        every = [p for split in raw.values() for files in split.values() for p in files]
        skipped.update({p: str(error) for p, error in scan_files(every).items()})
    lists = {split: _labelled(files, names, skipped) for split, files in raw.items()}
    if class_names is None:  # evaluation sets may lack classes; training sets may not
        _check_empty(lists["train"], names, "train")
    share = None
    if "val" in lists:
        train, val_list = lists["train"], lists["val"]
        layout = "split" if val is None else "explicit-val"
    else:
        share = held_out(len(lists["train"]), len(names))
        train, val_list = stratified_split(lists["train"], share, seed)
        layout = "folders" if data.is_dir() else "csv"
    splits = Splits(names, train, val_list, lists.get("test", []), sorted(skipped.items()), layout, task=task,
                    val_fraction=share)
    roots = [(files, data_root(val if split == "val" and val is not None else data)) for split, files in raw.items()]
    splits.outside_root = sorted({p for by_class, root in roots
                                  for p in outside_root([f for fs in by_class.values() for f in fs], root)})
    return splits


def _discover_multi(task: Task, data: Path, val: Path | None, tables: list[LabelTable],
                    held_out: Callable[[int, int], float], seed: int,
                    class_names: list[str] | None, scan: bool) -> Splits:
    """The multi-label part of :func:`discover`: classes are the sorted union of the train labels."""
    rows, val_rows = tables[0].rows, tables[1].rows if len(tables) > 1 else None
    names = class_names or sorted({label for _, labels in rows for label in labels})
    if not names:
        raise DataError(f"{data}: no image has any label; a multi-label set needs at least one labelled image")
    for split, split_rows in (("train", rows), ("val", val_rows or [])):
        _check_labels(split_rows, names, split, class_names is not None)
    skipped: dict[str, str] = {}
    if scan:
        every = [p for p, _ in rows + (val_rows or [])]
        skipped.update({p: str(error) for p, error in scan_files(every).items()})
    train = _multi_samples(rows, names, skipped)
    if class_names is None:  # a label none of whose training images can be read cannot be learnt
        present = task.counts([y for _, y in train], len(names))
        empty = [n for n, c in zip(names, present.tolist()) if c == 0]
        if not train or empty:
            raise DataError(f"label(s) with no readable train image: {empty or names}. Add images or drop the "
                            "label from the CSV.")
    share = None
    if val_rows is not None:
        val_samples, layout = _multi_samples(val_rows, names, skipped), "explicit-val"
    else:
        share = held_out(len(train), len(names))
        train_idx, val_idx = iterative_split(task.targets([y for _, y in train], len(names)), share, seed)
        train, val_samples, layout = [train[i] for i in train_idx], [train[i] for i in val_idx], "csv"
    splits = Splits(names, train, val_samples, [], sorted(skipped.items()), layout, task=task, val_fraction=share)
    outside = outside_root([p for p, _ in rows], data_root(data))
    if val_rows is not None and val is not None:
        outside += outside_root([p for p, _ in val_rows], data_root(val))
    splits.outside_root = sorted(set(outside))
    return splits


def _check_labels(rows: LabelRows, names: list[str], split: str, model_classes: bool) -> None:
    unknown = sorted({label for _, labels in rows for label in labels} - set(names))
    if unknown:
        whose = "the model's classes are" if model_classes else "train labels are"
        raise DataError(f"{split} has labels {'the model does not know' if model_classes else 'missing from train'}: "
                        f"{unknown[:10]}; {whose} {names[:20]}")


def _multi_samples(rows: LabelRows, names: list[str], skipped: dict[str, str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(names)}
    return sorted(((p, multi_hot([index[x] for x in labels], len(names))) for p, labels in rows if p not in skipped),
                  key=lambda sample: sample[0])


def data_root(source: str | Path) -> Path:
    """The folder a data source's relative paths and files belong to: a CSV's folder, or the folder."""
    source = Path(source)
    return source.parent if source.is_file() else source


def outside_root(paths: list[str], root: Path) -> list[str]:
    """The ``paths`` whose real location (symlinks resolved) is not inside ``root``'s."""
    base = os.path.realpath(root)
    prefix = base.rstrip(os.sep) + os.sep
    return [p for p in paths if not os.path.realpath(p).startswith(prefix)]


def read_source(data: Path, val: Path | None) -> dict[str, dict[str, list[str]]]:
    data = require_data(data)
    raw: dict[str, dict[str, list[str]]] = {}
    if data.is_file():
        raw["train"] = read_csv_list(data)
    else:
        split_dirs = find_split_dirs(data)
        if split_dirs:
            raw = {split: list_class_folder(path) for split, path in split_dirs.items()}
        else:
            raw["train"] = list_class_folder(data)
    if val is not None:
        if not val.exists():
            raise DataError(f"validation data not found: {val}")
        raw["val"] = read_csv_list(val) if val.is_file() else list_class_folder(val)
    return raw


def _check_classes(raw: dict, train_names: list[str], expected: list[str] | None) -> None:
    if expected is not None:
        for split, classes in raw.items():
            unknown = sorted(set(classes) - set(expected))
            if unknown:
                raise DataError(
                    f"{split} has classes the model does not know: {unknown}; "
                    f"the model's classes are: {expected}"
                )
        return
    for split in ("val", "test"):
        if split in raw:
            unknown = sorted(set(raw[split]) - set(train_names))
            if unknown:
                raise DataError(
                    f"{split} has classes missing from train: {unknown}; train classes are "
                    f"{train_names}. Add training images for them or remove them from {split}."
                )


def _labelled(files_by_class: dict[str, list[str]], names: list[str], skipped: dict[str, str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(names)}
    return sorted((p, index[c]) for c, files in files_by_class.items() for p in files if p not in skipped)


def _check_empty(samples: list[Sample], names: list[str], split: str) -> None:
    present = {label for _, label in samples}
    empty = [name for i, name in enumerate(names) if i not in present]
    if empty:
        raise DataError(
            f"class(es) with no readable {split} images: {empty}. Add images or remove the folder(s)."
        )


def write_skipped(skipped: list[tuple[str, str]], path: Path) -> None:
    with atomic_writer(path, "w") as fh:
        for file, reason in skipped:
            fh.write(f"{file}\t{reason}\n")


def write_split_csv(samples: list[Sample], names: list[str], path: Path, task: str | Task | None = None) -> None:
    """The exact split a run used (``RUN/splits/``), with absolute paths: ``path,label`` rows, or
    one-hot ``path,<class>,...`` rows for multi-label samples (no delimiter can clash with a name).

    ``task`` is the samples' task (by default the task of their labels)."""
    rules = task_scan(task or task_of([label for _, label in samples]))
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *rules.split_columns(names)])
        for p, label in samples:
            writer.writerow([os.path.abspath(p), *rules.split_cells(label, names)])


def read_split_csv(path: Path, class_names: list[str]) -> list[Sample]:
    """Rows written by :func:`write_split_csv` as samples; labels not in ``class_names`` are dropped."""
    index = {name: i for i, name in enumerate(class_names)}
    rows = [row for _, row in read_csv_rows(path, comments=False)]  # a path may start with '#'
    if rows and rows[0] != ["path", "label"]:  # one-hot: multi-label (write_split_csv's two headers)
        columns = [(c, index[name]) for c, name in enumerate(rows[0][1:], start=1) if name in index]
        return [(row[0], multi_hot([i for c, i in columns if row[c] == "1"], len(class_names)))
                for row in rows[1:] if len(row) == len(rows[0])]
    return [(row[0], index[row[1]]) for row in rows if len(row) >= 2 and row[0] != "path" and row[1] in index]


def discover_eval(data: str | Path, class_names: list[str], task: str | Task = PLAIN_TASK,
                  label_delim: str = DEFAULT_DELIM) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Labelled images to evaluate: every image of class folders / a CSV, or the ``test``
    (else ``val``) split of a train/val/test layout. Classes must be among ``class_names``.
    A multi-label model (``task`` the model's task, or its name) is evaluated on a multi-label CSV."""
    data = require_data(data)
    found = get_task(task)
    return task_scan(found).evaluate(found, data, class_names, label_delim)


def _eval_multi(task: Task, data: Path, class_names: list[str], label_delim: str
                ) -> tuple[list[Sample], list[tuple[str, str]]]:
    """:func:`discover_eval` of a multi-label model: a ``path,labels`` or one-hot CSV."""
    if not data.is_file():
        raise DataError(f"a {task.title} model is evaluated on a CSV of 'path,labels' or one-hot rows; "
                        f"{data} is a folder")
    rows = read_label_table(data, label_delim, task=task.name).rows
    _check_labels(rows, class_names, "evaluation data", True)
    skipped = {p: str(error) for p, error in scan_files([p for p, _ in rows]).items()}
    return _multi_samples(rows, class_names, skipped), sorted(skipped.items())


def _eval_single(task: Task, data: Path, class_names: list[str], label_delim: str
                 ) -> tuple[list[Sample], list[tuple[str, str]]]:
    """:func:`discover_eval` of a single-label model: class folders, a split layout or a ``path,label`` CSV."""
    split_dirs = find_split_dirs(data)
    if split_dirs:
        chosen = split_dirs.get("test") or split_dirs.get("val")
        if chosen is None:
            raise DataError(f"{data} has only a train split; pass the folder of labelled images to evaluate on")
        raw = list_class_folder(chosen)
    else:
        raw = read_csv_list(data) if data.is_file() else list_class_folder(data)
    _check_classes({"evaluation data": raw}, class_names, class_names)
    every = [p for files in raw.values() for p in files]
    skipped = {p: str(error) for p, error in scan_files(every).items()}
    return _labelled(raw, class_names, skipped), sorted(skipped.items())


@dataclass(frozen=True)
class TaskScan:
    """How one task's labelled images are found, evaluated and written down (see :func:`task_scan`).

    Attributes:
        discover: :func:`discover`'s part for the task: ``(task, data, val, tables, held_out,
            seed, class_names, scan) -> Splits`` (``held_out(n, num_classes)``: the share of ``n`` images
            a split holds out, :func:`held_out_fraction` as the call asked), given the label tables
            :func:`choose_task` read.
        evaluate: :func:`discover_eval`'s part: ``(task, data, class_names, label_delim) -> (samples, skipped)``.
        split_columns: the columns of a ``RUN/splits/`` CSV after ``path``, from the class names.
        split_cells: one label's cells under those columns.
    """

    discover: Callable[..., Splits]
    evaluate: Callable[[Task, Path, list[str], str], tuple[list[Sample], list[tuple[str, str]]]]
    split_columns: Callable[[list[str]], list[str]]
    split_cells: Callable[[Label, list[str]], list[str]]


#: Each task's :class:`TaskScan`, by :attr:`Task.name <visiontune.task.Task.name>`.
TASK_SCANS = {
    "single": TaskScan(_discover_single, _eval_single, split_columns=lambda names: ["label"],
                       split_cells=lambda label, names: [names[label]]),
    "multi": TaskScan(_discover_multi, _eval_multi, split_columns=lambda names: list(names),
                      split_cells=lambda label, names: [str(int(v)) for v in label.tolist()]),
}


def task_scan(task: str | Task) -> TaskScan:
    """The :class:`TaskScan` of ``task`` (a task or its name); KeyError lists the tasks that have one."""
    return per_task(TASK_SCANS, task, "data discovery")
