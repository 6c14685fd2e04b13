"""Labels of one sample, for both tasks, defined once.

- ``single``: one class per image; a label is the class index (``int``).
- ``multi``: any number of classes per image, none included; a label is a multi-hot float
  tensor ``[C]`` (1.0 where the class is present). Loaders stack such labels into ``[B, C]``.

Everything that turns labels into tensors, counts or names goes through this module, so the
rest of the code never asks which task it is for a label.

Example:
    >>> y = multi_hot([0, 2], 3); y.tolist(), label_names(y, ["cat", "dog", "car"])
    ([1.0, 0.0, 1.0], ['cat', 'car'])
    >>> stack_targets([1, 0]).tolist(), stack_targets([y, multi_hot([], 3)]).shape
    ([1, 0], torch.Size([2, 3]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Label = int | torch.Tensor
TASKS = ("single", "multi")


def multi_hot(indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """A float32 ``[num_classes]`` vector with 1.0 at ``indices``."""
    out = torch.zeros(num_classes, dtype=torch.float32)
    if len(indices):
        out[list(indices)] = 1.0
    return out


def is_multi(label: Label) -> bool:
    return isinstance(label, torch.Tensor)


def stack_targets(labels: Sequence[Label], num_classes: int | None = None) -> torch.Tensor:
    """Class indices ``[N]`` (long) for single-label, multi-hot ``[N, C]`` (float) for multi-label labels.

    ``num_classes`` shapes an empty multi-label list; it is not needed otherwise.
    """
    if len(labels) and is_multi(labels[0]):
        return torch.stack(list(labels)).float()
    if not len(labels) and num_classes is not None:
        return torch.zeros(0, num_classes)
    return torch.tensor([int(y) for y in labels], dtype=torch.long)


def label_indices(label: Label) -> list[int]:
    """The classes present in ``label``."""
    if is_multi(label):
        return [int(i) for i in torch.nonzero(label > 0.5).flatten()]
    return [int(label)]


def label_names(label: Label, class_names: Sequence[str]) -> list[str]:
    return [class_names[i] for i in label_indices(label)]


def label_counts(labels: Sequence[Label], num_classes: int) -> torch.Tensor:
    """Images per class ``[C]`` (float): each image counts once for each class it has."""
    if not len(labels):
        return torch.zeros(num_classes)
    if is_multi(labels[0]):
        return stack_targets(labels).sum(0)
    return torch.bincount(stack_targets(labels), minlength=num_classes).float()


def task_of(labels: Sequence[Label]) -> str:
    return "multi" if len(labels) and is_multi(labels[0]) else "single"
