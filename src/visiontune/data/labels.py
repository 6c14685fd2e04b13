"""Labels of one sample, for both tasks, defined once.

- ``single``: one class per image; a label is the class index (``int``).
- ``multi``: any number of classes per image, none included; a label is a multi-hot float
  tensor ``[C]`` (1.0 where the class is present). Loaders stack such labels into ``[B, C]``.

What a label means belongs to its :class:`~visiontune.task.Task`: the helpers here that turn
labels into tensors, counts or names ask the task of the labels (:func:`task_of`), so no caller
asks which kind a label is. The bounds on classes and the rules for a class name live here too:
data discovery checks them before anything is trained, and a model card (``model.json``) checks
the same ones when it is read. :func:`per_task` looks up the data layer's own per-task parts.

Example:
    >>> y = multi_hot([0, 2], 3); y.tolist(), label_names(y, ["cat", "dog", "car"])
    ([1.0, 0.0, 1.0], ['cat', 'car'])
    >>> stack_targets([1, 0]).tolist(), stack_targets([y, multi_hot([], 3)]).shape
    ([1, 0], torch.Size([2, 3]))
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from ..core.errors import DataError, VisiontuneError
from ..task import Label, Task, get_task
from ..task import task_of as _task_of

T = TypeVar("T")

# Classes of one model: its head, its logits (N x classes) and every per-class table are sized by
# this, so a list of names (a CSV's labels, a model.json) is refused above it before any of them.
MAX_CLASSES = 100_000
# Distinct labels of multi-label data. Everything multi-label is dense (multi-hot targets, the
# iterative split, per-label thresholds and metrics), so cost grows as images x labels: beyond
# this many labels most of them have a handful of images and cannot be learnt or evaluated anyway.
MAX_LABELS = 10_000
# Entries of the dense images x labels matrix of multi-label data (2**27: 512 MiB as float32).
# The split and the multi-hot targets hold a few copies of it, so this bounds their memory.
MAX_LABEL_MATRIX = 2**27
MAX_CLASS_NAME = 200  # characters of a class name: it ends up in file names, CSV cells and HTML
SHOWN_NAME = 60  # characters of a refused name quoted in a message


def multi_hot(indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """A float32 ``[num_classes]`` vector with 1.0 at ``indices``."""
    out = torch.zeros(num_classes, dtype=torch.float32)
    if len(indices):
        out[list(indices)] = 1.0
    return out


def task_of(labels: Sequence[Label]) -> Task:
    """The task whose labels these are (:func:`visiontune.task.task_of`; single-label when empty)."""
    return _task_of(labels)


def stack_targets(labels: Sequence[Label], num_classes: int | None = None) -> torch.Tensor:
    """The training targets of ``labels``, stacked by their task (:meth:`~visiontune.task.Task.targets`):
    class indices ``[N]`` (long) for single-label, multi-hot ``[N, C]`` (float) for multi-label labels.

    An empty list has no task to tell (it stacks as single-label): a caller that knows its task
    asks it instead, ``task.targets(labels, num_classes)``.
    """
    return task_of(labels).targets(labels, num_classes or 0)


def label_indices(label: Label) -> list[int]:
    """The classes present in ``label``."""
    return task_of([label]).indices(label)


def label_names(label: Label, class_names: Sequence[str]) -> list[str]:
    return [class_names[i] for i in label_indices(label)]


def label_counts(labels: Sequence[Label], num_classes: int) -> torch.Tensor:
    """Images per class ``[C]`` (float): each image counts once for each class it has."""
    return task_of(labels).counts(labels, num_classes)


def per_task(table: Mapping[str, T], task: str | Task, what: str) -> T:
    """``table``'s entry for ``task`` (a :class:`~visiontune.task.Task` or its name): how a layer
    above the task package keeps its own per-task parts, so that a new task adds one entry.

    Raises:
        KeyError: no entry for the task; the message lists the tasks that have one.

    Example:
        >>> per_task({"single": 1, "multi": 2}, "multi", "example")
        2
    """
    name = get_task(task).name
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"no {what} for task {name!r}: known tasks are {list(table)}") from None


def shown(name: Any) -> str:
    """``repr(name)``, cut to :data:`SHOWN_NAME` characters for a message."""
    if isinstance(name, str) and len(name) > SHOWN_NAME:
        return f"{name[:SHOWN_NAME]!r}... ({len(name)} characters)"
    return repr(name)


def shown_list(names: Sequence[Any], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` as a list for a message, each cut as :func:`shown` cuts it."""
    return "[" + ", ".join(map(shown, names[:limit])) + (", ...]" if len(names) > limit else "]")


def check_class_name(name: Any, where: str, error: type[VisiontuneError] = DataError) -> str:
    r"""``name`` if it can name a class: a string of 1-:data:`MAX_CLASS_NAME` characters, not only
    spaces, without control, format or unassigned characters (Unicode category C). Class names end
    up in file names, CSV cells, HTML, terminals and shells' arguments; raise ``error`` otherwise.

    Example:
        >>> check_class_name("golden retriever", "labels.csv:2: label")
        'golden retriever'
        >>> try:
        ...     check_class_name("red\x1b[0m", "labels.csv:3: label")
        ... except DataError as exc:
        ...     print(exc)  # doctest: +ELLIPSIS
        labels.csv:3: label 'red\x1b[0m' contains a control or invisible character ('\x1b'); rename it...
    """
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_CLASS_NAME:
        raise error(f"{where} {shown(name)} is not a class name: a name has 1-{MAX_CLASS_NAME} characters, not "
                    "only spaces; rename it")
    # str.isprintable() is False for every category C character (and for spaces other than " "): a
    # fast test that leaves the per-character look-up to the names it flags
    bad = None if name.isprintable() else next((ch for ch in name if unicodedata.category(ch)[0] == "C"), None)
    if bad is not None:
        raise error(f"{where} {shown(name)} contains a control or invisible character ({bad!r}); rename it with "
                    "printable characters")
    return name


def check_class_names(names: Any, where: str = "class_names", error: type[VisiontuneError] = DataError) -> list[str]:
    """Class names as a list of at most :data:`MAX_CLASSES` distinct names that pass
    :func:`check_class_name`; raise ``error`` (``DataError`` for data, ``ArtifactError`` for a
    ``model.json``) naming the first bad one."""
    if not isinstance(names, list) or not names:
        raise error(f"{where} must be a non-empty list of names")
    if len(names) > MAX_CLASSES:  # before anything is sized by it (a logits buffer of N x classes)
        raise error(f"{where} lists {len(names)} classes; at most {MAX_CLASSES} are supported")
    for name in names:
        check_class_name(name, f"{where}:", error)
    if len(set(names)) != len(names):
        seen: set[str] = set()
        twice = next(name for name in names if name in seen or seen.add(name))
        raise error(f"{where} lists {shown(twice)} twice; class names must be distinct")
    return list(names)
