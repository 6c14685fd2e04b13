"""Single-label metrics (torchmetrics) and ``misclassified.csv``: one class per image, decided by argmax.

Example:
    >>> probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> m = compute_metrics(probs, torch.tensor([0, 1, 1]), ["cat", "dog"])
    >>> round(m["accuracy"], 4), m["confusion_matrix"]
    (0.6667, [[1, 0], [1, 1]])
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from ..core.errors import DataError
from ..core.safe_io import atomic_writer, spreadsheet_safe
from .calibration import ECE_BINS, expected_calibration_error


def compute_metrics(probs: torch.Tensor, target: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, top-5, macro and per-class precision/recall/F1 and the confusion matrix (torchmetrics),
    and ``ece``: the expected calibration error of ``probs`` (:data:`ECE_BINS` equal-width bins), which
    says whether the model's stated confidence can be taken at its word on this data."""
    n = len(class_names)
    if len(target) == 0:
        raise DataError("no readable labelled images to evaluate; check the data path and the skipped files")
    kw = {"num_classes": n, "validate_args": False}
    precision = multiclass_precision(probs, target, average="none", **kw)
    recall = multiclass_recall(probs, target, average="none", **kw)
    f1 = multiclass_f1_score(probs, target, average="none", **kw)
    support = torch.bincount(target, minlength=n)
    present = support > 0  # classes absent from the data do not drag the macro averages down
    result: dict[str, Any] = {
        "accuracy": float(multiclass_accuracy(probs, target, average="micro", **kw)),
    }
    if n >= 5:
        result["top5_accuracy"] = float(multiclass_accuracy(probs, target, average="micro", top_k=5, **kw))
    result.update({
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "ece": expected_calibration_error(probs, target),
        "ece_bins": ECE_BINS,
        "confusion_matrix": multiclass_confusion_matrix(probs, target, **kw).tolist(),
        "class_names": list(class_names),
        "num_samples": int(len(target)),
    })
    return result


def write_misclassified(predictions, class_names: list[str], path: Path) -> int:
    """``misclassified.csv``: every wrong prediction with its probabilities (``predictions``:
    ``(path, true class index, probabilities [C])`` triples)."""
    rows = 0
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true", "predicted", "probability", "true_probability"])
        for file, true, probs in predictions:
            true, pred = int(true), int(probs.argmax())
            if pred != true:
                writer.writerow([spreadsheet_safe(str(file)), spreadsheet_safe(class_names[true]),
                                 spreadsheet_safe(class_names[pred]), f"{float(probs[pred]):.4f}",
                                 f"{float(probs[true]):.4f}"])
                rows += 1
    return rows
