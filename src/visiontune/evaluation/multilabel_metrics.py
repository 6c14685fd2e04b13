"""Multi-label metrics (torchmetrics) and the per-label decision thresholds tuned on val.

Example:
    >>> probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
    >>> target = torch.tensor([[1, 0], [0, 1], [0, 1]])
    >>> [round(t, 4) for t in tune_thresholds(probs, target, min_support=1)]
    [0.75, 0.45]
    >>> m = multilabel_metrics(probs, target, ["cat", "dog"], [0.75, 0.45]); m["subset_accuracy"]
    1.0
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_hamming_distance,
    multilabel_precision,
    multilabel_recall,
)

from ..core.errors import DataError
from ..core.safe_io import atomic_writer, spreadsheet_safe
from ..task import MultiLabel

MIN_THRESHOLD_SUPPORT = 5  # val positives a label needs for a threshold of its own; fewer: the global one


def best_f1_threshold(probs: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of the decisions ``probs >= threshold`` (1-D tensors).

    The threshold lies halfway between the lowest probability called positive and the next one
    below it, so that a slightly different score on new data is decided the same way.
    """
    positives = int(target.sum())
    if positives == 0:
        return 1.0, 0.0
    order = torch.argsort(probs, descending=True)
    p, t = probs[order].double(), target[order].double()
    tp = torch.cumsum(t, 0)
    called = torch.arange(1, len(p) + 1, dtype=torch.float64)
    f1 = 2 * tp / (called + positives)
    last = (p[:-1] != p[1:]).nonzero().flatten().tolist() + [len(p) - 1]  # cut only between distinct scores
    k = max(last, key=lambda i: (float(f1[i]), -i))
    below = float(p[k + 1]) if k + 1 < len(p) else 0.0
    # decided in float32 like every prediction: the midpoint, or the next float above the score below
    mid = np.float32((float(p[k]) + below) / 2)
    if mid <= np.float32(below):
        mid = np.nextafter(np.float32(below), np.float32(1.0))
    return float(min(mid, np.float32(p[k]))), float(f1[k])


def tune_thresholds(probs: torch.Tensor, target: torch.Tensor,
                    min_support: int = MIN_THRESHOLD_SUPPORT) -> list[float]:
    """Per-label thresholds maximising each label's F1 on validation ``probs``/``target`` ``[N, C]``;
    labels with fewer than ``min_support`` positives share the threshold that maximises the F1 of
    all label decisions together (micro F1)."""
    global_threshold, _ = best_f1_threshold(probs.flatten(), target.flatten())
    out = []
    for c in range(probs.shape[1]):
        if int(target[:, c].sum()) >= min_support:
            out.append(best_f1_threshold(probs[:, c], target[:, c])[0])
        else:
            out.append(global_threshold)
    return out


def decisions(probs: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """0/1 decisions ``[N, C]``: each label's probability at or above its threshold."""
    return (probs >= torch.tensor(list(thresholds), dtype=probs.dtype)).int()


def multilabel_metrics(probs: torch.Tensor, target: torch.Tensor, class_names: list[str],
                       thresholds: Sequence[float]) -> dict[str, Any]:
    """mAP (macro, micro), per-label AP / precision / recall / F1 / support at ``thresholds``,
    micro and macro F1, example-based F1, subset accuracy, Hamming loss and label cardinality."""
    n = len(class_names)
    if len(target) == 0:
        raise DataError("no readable labelled images to evaluate; check the data path and the skipped files")
    target = target.int()
    preds = decisions(probs, thresholds).float()  # torchmetrics thresholds these at 0.5: the same decisions
    kw = {"num_labels": n, "validate_args": False}
    ap = multilabel_average_precision(probs.float(), target, average="none", **kw)
    support = target.sum(0)
    present = support > 0  # labels absent from the data have no AP and do not drag the averages down
    precision = multilabel_precision(preds, target, average="none", **kw)
    recall = multilabel_recall(preds, target, average="none", **kw)
    f1 = multilabel_f1_score(preds, target, average="none", **kw)
    samplewise = multilabel_f1_score(preds, target, average="micro", multidim_average="samplewise", **kw)
    return {
        "task": MultiLabel.name,
        "macro_map": float(ap[present].mean()) if present.any() else 0.0,
        "micro_map": float(multilabel_average_precision(probs.float(), target, average="micro", **kw)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "micro_f1": float(multilabel_f1_score(preds, target, average="micro", **kw)),
        "example_f1": float(samplewise.mean()),
        "subset_accuracy": float(multilabel_exact_match(preds, target, **kw)),
        "hamming_loss": float(multilabel_hamming_distance(preds, target, average="micro", **kw)),
        "label_cardinality": {"predicted": float(preds.sum(1).mean()), "true": float(target.float().sum(1).mean())},
        "per_label": {
            name: {"ap": float(ap[i]) if present[i] else None, "precision": float(precision[i]),
                   "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i]),
                   "threshold": float(thresholds[i])}
            for i, name in enumerate(class_names)
        },
        "class_names": list(class_names),
        "num_samples": int(len(target)),
    }


def write_label_errors(predictions, class_names: list[str], thresholds: Sequence[float], path: Path) -> int:
    """``misclassified.csv`` of a multi-label model: every image whose label set is wrong, with
    the labels it missed and the ones it added."""
    rows = 0
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true", "predicted", "missed", "extra"])
        for file, true, probs in predictions:
            truth = {class_names[i] for i in torch.nonzero(true > 0.5).flatten().tolist()}
            called = {class_names[i] for i in torch.nonzero(decisions(probs[None], thresholds)[0]).flatten().tolist()}
            if truth != called:
                writer.writerow([spreadsheet_safe(str(cell)) for cell in (
                    file, " ".join(sorted(truth)), " ".join(sorted(called)), " ".join(sorted(truth - called)),
                    " ".join(sorted(called - truth)))])
                rows += 1
    return rows
