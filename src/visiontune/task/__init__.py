"""What kind of answer a model gives, resolved once and asked everywhere: the :class:`Task`.

A task owns everything that differs between single-label (one class per image, softmax) and
multi-label (any number of labels, a sigmoid per label) models: how labels become training
targets, the loss, probabilities and the decision rule, the running accuracy and the selection
scores, the prediction row and its CSV cells, the balancing weights, what ``model.json`` records,
and the names of the figures compress and export report. No other layer branches on the kind:
it asks the model's task. A third kind (open-set, hierarchical) is one new subclass registered
in :data:`TASKS`; the layers above that keep per-task parts (report sections, calibration) look
them up by :attr:`Task.name` in their own registry, whose error lists what is known.

Example:
    >>> task = get_task("multi")
    >>> task.title, task.activation
    ('multi-label', 'sigmoid per label')
    >>> task.row(torch.tensor([0.9, 0.3]), ["ant", "bee"], top_k=1, thresholds=[0.5, 0.2])["labels"]
    ['ant', 'bee']
    >>> get_task("single").row(torch.tensor([0.2, 0.8]), ["ant", "bee"], top_k=1)["label"]
    'bee'
"""

from __future__ import annotations

from .base import UNKNOWN, Label, Task
from .multi import MultiLabel
from .single import SingleLabel

__all__ = ["TASKS", "UNKNOWN", "Label", "MultiLabel", "SingleLabel", "Task", "get_task", "task_of", "task_names"]

import torch  # noqa: E402, F401  (used by the doctest)

#: Every task by its ``model.json`` name (``inference.task``).
TASKS: dict[str, Task] = {t.name: t for t in (SingleLabel(), MultiLabel())}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a :class:`Task` is returned as is).

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}: known tasks are {task_names()}") from None


def task_of(labels) -> Task:
    """The task whose labels these are (class indices: single-label; multi-hot vectors: multi-label)."""
    return next((t for t in TASKS.values() if len(labels) and t.owns(labels[0])), TASKS["single"])
