"""The loss and the running accuracy of each task, defined once for every trainer.

- single-label: cross-entropy (class weights, label smoothing); accuracy = top-1.
- multi-label: binary cross-entropy on each label's logit (``pos_weight`` from ``--balance
  weights``); accuracy = share of label decisions right at p = 0.5 (1 - Hamming loss). (The
  asymmetric loss of Ridnik et al. 2021 was tried on the mosaic benchmark and did not pay:
  bench/RESULTS.md, "Multi-label: loss".)

Example:
    >>> y = torch.tensor([[1.0, 0.0]]); logits = torch.tensor([[2.0, 1.0]])
    >>> accuracy_of(logits, y)
    0.5
    >>> round(float(loss_function(True)(logits, y)), 4)
    0.7201
"""

from __future__ import annotations

import torch
from torch import nn


def loss_function(multi_label: bool, class_weights: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> nn.Module:
    """The training loss; ``class_weights`` are per-class weights, or per-label ``pos_weight``."""
    if multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=class_weights)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def accuracy_of(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy of class indices, or label-wise accuracy at p = 0.5 of multi-hot targets."""
    if target.dim() == 2:
        return float(((logits > 0) == (target > 0.5)).float().mean())
    return float((logits.argmax(1) == target).float().mean())


def plain_loss(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The unweighted loss of the task (for logging validation)."""
    if target.dim() == 2:
        return float(nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float()))
    return float(nn.functional.cross_entropy(logits.float(), target))
