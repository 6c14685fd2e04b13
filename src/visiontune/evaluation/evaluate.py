"""``visiontune.evaluate``: accuracy, top-5, per-class P/R/F1, confusion matrix, error list."""

from __future__ import annotations

import csv
import os
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
from ..core.safe_io import atomic_writer, refuse_link, spreadsheet_safe
from ..data.labels import stack_targets
from ..data.scan import Sample, discover_eval
from ..inference.classifier import Classifier
from ..inference.rows import probabilities
from .multilabel import multilabel_metrics, write_label_errors
from .plots import plot_confusion_matrix


def evaluate(model: str | os.PathLike | Classifier, data: str | os.PathLike, batch_size: int = 64,
             workers: int | None = None, save: bool = True, label_delim: str = " ",
             out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score a trained model on labelled data.

    Args:
        model: a run dir, a ``model/`` dir, or a loaded :class:`Classifier`.
        data: class folders, a split layout (its ``test`` split, else ``val``) or a CSV
            (multi-label models: a ``path,labels`` or one-hot CSV).
        save: write ``confusion_matrix.png`` and ``misclassified.csv`` (cells that a spreadsheet
            would run as formulas start with ``'``) into ``out``.
        label_delim: separator of the labels in one cell of a multi-label ``path,labels`` CSV.
        out: folder for those files (created); default: next to the model.

    Returns:
        ``accuracy``, ``top5_accuracy`` (>= 5 classes), ``macro_precision``, ``macro_recall``,
        ``macro_f1``, ``per_class``, ``confusion_matrix`` (rows = true), ``class_names``,
        ``num_samples`` (and ``skipped``: unreadable files). A multi-label model's result is
        :func:`~visiontune.evaluation.multilabel.multilabel_metrics` (``task`` = ``multi``).

    Example:
        visiontune.evaluate("runs/train-1", "data/test")["accuracy"]
        # -> 0.97
    """
    clf = model if isinstance(model, Classifier) else Classifier.load(model)  # run, model, pruned or .onnx
    folder = Path(out) if out is not None else Path(clf.card.model_dir)
    if save:  # refused before any work, so that nothing is lost: a model folder may come from anyone
        for name in ("misclassified.csv", "confusion_matrix.png"):
            refuse_link(folder / name)
        folder.mkdir(parents=True, exist_ok=True)
    samples, skipped = discover_eval(data, clf.class_names, clf.card.task, label_delim)
    result = evaluate_samples(clf, samples, batch_size, workers, keep_predictions=save)
    result["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    if save and clf.multi_label:
        write_label_errors(result.pop("predictions"), clf.class_names, clf.thresholds or [],
                           folder / "misclassified.csv")
    elif save:
        plot_confusion_matrix(result["confusion_matrix"], clf.class_names, folder / "confusion_matrix.png")
        write_misclassified(result.pop("predictions"), clf.class_names, folder / "misclassified.csv")
    return result


def evaluate_samples(clf: Classifier, samples: list[Sample], batch_size: int = 64, workers: int | None = None,
                     keep_predictions: bool = False) -> dict[str, Any]:
    """Metrics of ``clf`` on labelled ``samples`` (unreadable ones are left out)."""
    paths = [p for p, _ in samples]
    logits, ok, _ = clf.logits_of(paths, batch_size, workers)
    return metrics_of_logits(logits, ok, samples, clf.class_names, clf.temperature, keep_predictions,
                             clf.thresholds)


def metrics_of_logits(logits: torch.Tensor, ok: torch.Tensor, samples: list[Sample], class_names: list[str],
                      temperature: float = 1.0, keep_predictions: bool = False,
                      thresholds: list[float] | None = None) -> dict[str, Any]:
    """:func:`compute_metrics` of raw logits of ``samples`` (``ok``: the readable ones); with
    ``thresholds`` (a multi-label model's) :func:`multilabel_metrics`."""
    multi = thresholds is not None
    probs = probabilities(logits, temperature, multi_label=multi)
    target = stack_targets([label for _, label in samples], len(class_names) if multi else None)
    if multi:
        result = multilabel_metrics(probs[ok], target[ok], class_names, thresholds)
    else:
        result = compute_metrics(probs[ok], target[ok], class_names)
    if keep_predictions:
        result["predictions"] = [(p, t if multi else int(t), pr)
                                 for (p, _), t, pr, good in zip(samples, target, probs, ok) if good]
    return result


def compute_metrics(probs: torch.Tensor, target: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, top-5, macro and per-class precision/recall/F1 and the confusion matrix (torchmetrics)."""
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
        "confusion_matrix": multiclass_confusion_matrix(probs, target, **kw).tolist(),
        "class_names": list(class_names),
        "num_samples": int(len(target)),
    })
    return result


def write_misclassified(predictions, class_names: list[str], path: Path) -> int:
    """``misclassified.csv``: every wrong prediction with its probabilities."""
    rows = 0
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true", "predicted", "probability", "true_probability"])
        for file, true, probs in predictions:
            pred = int(probs.argmax())
            if pred != true:
                writer.writerow([spreadsheet_safe(str(file)), spreadsheet_safe(class_names[true]),
                                 spreadsheet_safe(class_names[pred]), f"{float(probs[pred]):.4f}",
                                 f"{float(probs[true]):.4f}"])
                rows += 1
    return rows
