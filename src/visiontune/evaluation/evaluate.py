"""``visiontune.evaluate``: a model's metrics on labelled data and its error list, and the
temperature fit on a run's validation split; what differs per task comes from
:func:`~visiontune.evaluation.parts.parts_of`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ArtifactError, ConfigError
from ..core.layout import RunLayout
from ..core.safe_io import refuse_link
from ..data.scan import Sample, discover_eval, read_split_csv
from ..inference.classifier import Classifier, expand_inputs
from ..task import Task
from .calibration import store_calibration
from .parts import parts_of
from .unknown_metrics import unknown_metrics

# the figures of an evaluation that a run's card keeps, its log line prints and MLflow records (the
# others, per class or per label, stay in the full result)
HEADLINE_METRICS = ("accuracy", "macro_f1", "top5_accuracy", "macro_map", "micro_map", "micro_f1")


def evaluate(model: str | os.PathLike | Classifier, data: str | os.PathLike, batch_size: int = 64,
             workers: int | None = None, save: bool = True, label_delim: str = " ",
             out: str | os.PathLike | None = None, unknown: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score a trained model on labelled data (and, with ``unknown``, its unknown-score).

    Args:
        model: a run dir, a ``model/`` dir, or a loaded :class:`Classifier`.
        data: class folders, a split layout (its ``test`` split, else ``val``) or a CSV
            (multi-label models: a ``path,labels`` or one-hot CSV).
        save: write ``confusion_matrix.png`` and ``misclassified.csv`` (cells that a spreadsheet
            would run as formulas start with ``'``) into ``out``; a multi-label model writes its
            ``misclassified.csv`` of wrong label sets.
        label_delim: separator of the labels in one cell of a multi-label ``path,labels`` CSV.
        out: folder for those files (created); default: next to the model.
        unknown: a folder (recursive) or file pattern of images of no class the model knows: the
            result gains ``unknown``, :func:`~visiontune.evaluation.unknown_metrics.unknown_metrics`
            (the model needs an unknown-score: trained by this version, not with ``--no-unknown``).

    Returns:
        ``accuracy``, ``top5_accuracy`` (>= 5 classes), ``macro_precision``, ``macro_recall``,
        ``macro_f1``, ``per_class``, ``confusion_matrix`` (rows = true), ``class_names``,
        ``num_samples`` (and ``skipped``: unreadable files). A multi-label model's result is
        :func:`~visiontune.evaluation.multilabel_metrics.multilabel_metrics` (``task`` = ``multi``).

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
    if unknown is not None and clf.unknown_threshold is None:
        raise ConfigError("--unknown needs a model with an unknown-score: retrain it with this version (without "
                          "--no-unknown), or export it again from a run that has one")
    unknown_files = [f for f in expand_inputs([str(unknown)]) if Path(f).is_file()] if unknown is not None else []
    if unknown is not None and not unknown_files:
        raise ConfigError(f"--unknown {unknown}: no images found there")
    samples, skipped = discover_eval(data, clf.class_names, clf.task, label_delim)
    if unknown is None:
        result = evaluate_samples(clf, samples, batch_size, workers, keep_predictions=save)
    else:  # one pass over the known images gives the metrics and their unknown-scores
        outputs, ok, _ = clf.outputs_of([p for p, _ in samples], batch_size, workers)
        result = metrics_of_logits(clf.split(outputs)[0], ok, samples, clf.class_names, clf.task, clf.temperature,
                                   clf.card.thresholds, save)
        result["unknown"] = unknown_of(clf, samples, unknown_files, batch_size, workers, known=(outputs, ok))
    result["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    if save:
        predictions = result.pop("predictions")
        parts_of(clf.task).save_errors(result, predictions, clf.class_names, clf.card.thresholds, folder)
    return result


def unknown_of(clf: Classifier, samples: list[Sample], unknown_files: list[str], batch_size: int = 64,
               workers: int | None = None, known: tuple[torch.Tensor, torch.Tensor] | None = None,
               strangers: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """:func:`unknown_metrics` of ``clf`` on known ``samples`` and ``unknown_files``; ``known`` and
    ``strangers``: their :meth:`~Classifier.outputs_of` (outputs, readable mask) when the caller has them."""
    outputs, ok = known if known is not None else clf.outputs_of([p for p, _ in samples], batch_size, workers)[:2]
    logits, scores = clf.split(outputs[ok])
    correct = None
    if clf.task.name == "single":
        target = clf.task.targets([y for _, y in samples], len(clf.class_names))[ok]
        correct = (logits.argmax(-1) == target).numpy()
    unk, unk_ok = strangers if strangers is not None else clf.outputs_of(unknown_files, batch_size, workers)[:2]
    return unknown_metrics(scores.numpy(), correct, clf.split(unk[unk_ok])[1].numpy(), clf.unknown_threshold)


def evaluate_samples(clf: Classifier, samples: list[Sample], batch_size: int = 64, workers: int | None = None,
                     keep_predictions: bool = False) -> dict[str, Any]:
    """Metrics of ``clf`` on labelled ``samples`` (unreadable ones are left out)."""
    paths = [p for p, _ in samples]
    logits, ok, _ = clf.logits_of(paths, batch_size, workers)
    return metrics_of_logits(logits, ok, samples, clf.class_names, clf.task, clf.temperature, clf.card.thresholds,
                             keep_predictions)


def metrics_of_logits(logits: torch.Tensor, ok: torch.Tensor, samples: list[Sample], class_names: list[str],
                      task: Task, temperature: float = 1.0, thresholds: Sequence[float] = (),
                      keep_predictions: bool = False) -> dict[str, Any]:
    """The ``task``'s metrics of raw logits of ``samples`` (``ok``: the readable ones) at a calibration
    ``temperature`` and the model's decision ``thresholds`` (a multi-label model's; one per class).

    With ``keep_predictions``, ``predictions`` lists ``(path, target, probabilities)`` of each readable image.
    """
    probs = task.probabilities(logits, temperature)
    target = task.targets([label for _, label in samples], len(class_names))
    result = parts_of(task).metrics(probs[ok], target[ok], class_names, thresholds)
    if keep_predictions:
        result["predictions"] = [(p, t, pr) for (p, _), t, pr, good in zip(samples, target, probs, ok) if good]
    return result


def calibrate_run(run_dir: str | os.PathLike, batch_size: int = 64, workers: int | None = None) -> dict[str, Any]:
    """Fit temperature scaling on the run's ``splits/val.csv`` and store it in ``model.json``.

    Returns the calibration entry: ``{"temperature", "ece_before", "ece_after", "nll_before",
    "nll_after", "num_val", ...}`` (see :mod:`~visiontune.evaluation.calibration`).
    """
    layout = RunLayout(run_dir)
    val_csv = layout.split_csv("val")
    if not val_csv.is_file():
        raise ArtifactError(f"{val_csv} not found: calibration needs the run's validation split")
    clf = Classifier.load(layout.root, precision="32")
    samples = read_split_csv(val_csv, clf.class_names)
    if not samples:
        raise ArtifactError(f"{val_csv} holds no usable validation images")
    logits, ok, _ = clf.logits_of([p for p, _ in samples], batch_size, workers)
    target = clf.task.targets([y for _, y in samples], clf.card.num_classes)[ok]
    return store_calibration(layout.root, parts_of(clf.task).calibrate(logits[ok], target))
