"""The per-task parts of evaluation, one :class:`EvaluationParts` per task in :data:`PARTS`.

The task package (:mod:`visiontune.task`) owns what every layer asks of a task; what needs this
layer (torchmetrics reports, calibration fits, report sections, error files) is bundled here,
keyed by :attr:`~visiontune.task.Task.name` and looked up with :func:`parts_of`. A third task
adds one entry.

Example:
    >>> parts_of(get_task("multi")).calibrate is multilabel_calibration
    True
    >>> parts_of("single").metrics(torch.tensor([[0.9, 0.1]]), torch.tensor([0]), ["ant", "bee"], [])["accuracy"]
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.labels import per_task
from ..task import Task, get_task  # noqa: F401  (get_task: used by the doctest)
from .calibration import calibration_note, calibration_summary, label_calibration_note, multilabel_calibration
from .multilabel_metrics import MIN_THRESHOLD_SUPPORT, multilabel_metrics, tune_thresholds, write_label_errors
from .plots import plot_confusion_matrix
from .report_multilabel import multilabel_sections
from .report_sections import ReportInputs
from .report_singlelabel import single_label_sections
from .singlelabel_metrics import compute_metrics, write_misclassified

#: ``(probabilities [N, C], targets, class names, decision thresholds) -> metrics``
Metrics = Callable[[torch.Tensor, torch.Tensor, list[str], Sequence[float]], dict[str, Any]]
#: ``(raw logits, targets, source=...) -> the model.json calibration entry``
Calibrate = Callable[..., dict[str, Any]]
#: ``(calibrated probabilities, targets) -> (decision thresholds, lines for the training log)``
TuneDecisions = Callable[[torch.Tensor, torch.Tensor], tuple[list[float], list[str]]]
#: ``(metrics, predictions, class names, thresholds, folder) -> None``: the files of evaluate(save=True)
SaveErrors = Callable[[dict[str, Any], list, list[str], Sequence[float], Path], None]


@dataclass(frozen=True)
class EvaluationParts:
    """What evaluation does differently for one task.

    Attributes:
        metrics: the metrics of probabilities against targets (``visiontune evaluate``, the card's
            val/test metrics).
        calibrate: the temperature fit of raw logits against targets (``source`` names the images).
        calibration_note: how the training log states a fitted calibration entry.
        tune_decisions: the decision thresholds fitted on calibrated val probabilities (none
            where the decision needs none), with what to print about them.
        report_sections: the task's sections of ``report.html``.
        save_errors: the files ``evaluate`` writes beside the model (its ``misclassified.csv``).
    """

    metrics: Metrics
    calibrate: Calibrate
    calibration_note: Callable[[dict[str, Any]], str]
    tune_decisions: TuneDecisions
    report_sections: Callable[[ReportInputs], list[tuple[str, str]]]
    save_errors: SaveErrors


def _argmax_metrics(probs: torch.Tensor, target: torch.Tensor, class_names: list[str],
                    thresholds: Sequence[float]) -> dict[str, Any]:
    return compute_metrics(probs, target, class_names)  # argmax decides: thresholds do not apply


def _nothing_to_tune(probs: torch.Tensor, target: torch.Tensor) -> tuple[list[float], list[str]]:
    return [], []


def _tuned_thresholds(probs: torch.Tensor, target: torch.Tensor) -> tuple[list[float], list[str]]:
    thresholds = tune_thresholds(probs, target)
    own = sum(1 for c in range(target.shape[1]) if int(target[:, c].sum()) >= MIN_THRESHOLD_SUPPORT)
    return thresholds, [f"thresholds: tuned on val for max F1, {own} of {len(thresholds)} label(s) with their own "
                        f"(the others, with < {MIN_THRESHOLD_SUPPORT} val images, share one); stored in model.json, "
                        "predict --threshold overrides them"]


def _confusion_and_misclassified(result: dict[str, Any], predictions: list, class_names: list[str],
                                 thresholds: Sequence[float], folder: Path) -> None:
    plot_confusion_matrix(result["confusion_matrix"], class_names, folder / "confusion_matrix.png")
    write_misclassified(predictions, class_names, folder / "misclassified.csv")


def _label_errors(result: dict[str, Any], predictions: list, class_names: list[str], thresholds: Sequence[float],
                  folder: Path) -> None:
    write_label_errors(predictions, class_names, thresholds, folder / "misclassified.csv")


#: The evaluation parts of every task, by task name.
PARTS: dict[str, EvaluationParts] = {
    "single": EvaluationParts(metrics=_argmax_metrics, calibrate=calibration_summary,
                              calibration_note=calibration_note, tune_decisions=_nothing_to_tune,
                              report_sections=single_label_sections, save_errors=_confusion_and_misclassified),
    "multi": EvaluationParts(metrics=multilabel_metrics, calibrate=multilabel_calibration,
                             calibration_note=label_calibration_note, tune_decisions=_tuned_thresholds,
                             report_sections=multilabel_sections, save_errors=_label_errors),
}


def parts_of(task: Task | str) -> EvaluationParts:
    """The evaluation parts of ``task`` (a :class:`~visiontune.task.Task` or its name).

    Raises:
        KeyError: a task without parts; the message lists the tasks that have them.
    """
    return per_task(PARTS, task, "evaluation parts")
