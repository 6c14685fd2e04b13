"""Logits -> prediction rows, defined once for ``predict``, bulk predict, ``evaluate`` and ``serve``.

The model's :class:`~visiontune.task.Task` shapes each row; these functions apply it to a batch
and lay rows out as the predictions CSV.

A single-label row is ``{"path", "label", "probability", "top_k": [{"label", "probability"}],
"calibrated", "error"}``: probabilities are ``softmax(logits / temperature)`` (the calibration
stored in model.json), ``top_k`` lists the k most probable classes, and with ``reject_below=P``
the label is ``unknown`` when the top probability is below P (``top_k`` still lists the classes).
An unreadable input gets a row with its ``error`` and no label.

A model with an unknown-score (:mod:`visiontune.models.unknown`) adds ``unknown`` (the score is
below the model's threshold) and ``unknown_score`` to each row; a rejected single-label row's
``label`` is ``unknown``, a rejected multi-label row has no ``labels``.

A multi-label model's row has ``labels`` (every class whose probability ``sigmoid(logit / T)``
reaches its threshold, possibly none) and ``scores`` (each class's probability) in place of
``label`` and ``probability``; ``top_k`` is the same ranking.

Example:
    >>> from visiontune.task import get_task
    >>> single, multi = get_task("single"), get_task("multi")
    >>> rows = prediction_rows(torch.tensor([[2.0, 0.0]]), ["ant", "bee"], top_k=1, task=single)
    >>> rows[0]["label"], round(rows[0]["probability"], 3)
    ('ant', 0.881)
    >>> csv_cells(rows[0], 1, ["ant", "bee"], task=single)
    ['', 'ant', '0.880797', 'ant', '0.880797', '']
    >>> rows = prediction_rows(torch.tensor([[2.0, -1.0]]), ["ant", "bee"], top_k=1, thresholds=[0.5, 0.2],
    ...                        task=multi)
    >>> rows[0]["labels"], round(rows[0]["scores"]["bee"], 3)
    (['ant', 'bee'], 0.269)
    >>> csv_header(1, ["ant", "bee"], task=multi)
    ['path', 'labels', 'p_ant', 'p_bee', 'top1_label', 'top1_probability', 'error']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..core.safe_io import spreadsheet_safe
from ..task import UNKNOWN, Task

__all__ = ["UNKNOWN", "csv_cells", "csv_header", "error_row", "mark_unknown", "prediction_rows", "probabilities"]


def probabilities(logits: torch.Tensor, temperature: float = 1.0, *, task: Task) -> torch.Tensor:
    """The ``task``'s probabilities of ``logits`` at a calibration ``temperature``: ``softmax(logits / T)``
    over the last dimension, or each logit's ``sigmoid(logit / T)`` (float32, or float64 if given)."""
    return task.probabilities(logits, temperature)


def error_row(path: str, error: str, calibrated: bool = False, *, task: Task) -> dict[str, Any]:
    """The ``task``'s row of an input that could not be read."""
    return task.error_row(path, error, calibrated)


def prediction_rows(logits: torch.Tensor, class_names: Sequence[str], temperature: float = 1.0, top_k: int = 5,
                    reject_below: float | None = None, calibrated: bool = False,
                    paths: Sequence[str] | None = None, thresholds: Sequence[float] | None = None, *,
                    task: Task, unknown_scores: torch.Tensor | None = None,
                    unknown_threshold: float | None = None) -> list[dict[str, Any]]:
    """One ``task`` row per row of ``logits`` ``[N, C]``.

    ``reject_below`` applies to single-label rows, ``thresholds`` (one per class; 0.5 each when
    None) to multi-label ones: each task ignores the other's. ``unknown_scores`` ``[N]`` with
    ``unknown_threshold``: :func:`mark_unknown` on each row.
    """
    probs = task.probabilities(logits, temperature)
    paths = paths if paths is not None else [""] * len(probs)
    rows = [task.row(p, class_names, top_k, calibrated, path, thresholds, reject_below)
            for p, path in zip(probs, paths)]
    if unknown_scores is not None and unknown_threshold is not None:
        rows = [mark_unknown(row, float(s), unknown_threshold, task=task) for row, s in zip(rows, unknown_scores)]
    return rows


def mark_unknown(row: dict[str, Any], score: float, threshold: float, *, task: Task) -> dict[str, Any]:
    """``row`` with ``unknown`` (``score`` below ``threshold``) and ``unknown_score``; a rejected row
    answers as the ``task`` rejects (:meth:`~visiontune.task.Task.reject`)."""
    row = {**row, "unknown": bool(score < threshold), "unknown_score": score}
    return task.reject(row) if row["unknown"] else row


def csv_header(k: int, class_names: Sequence[str], *, task: Task, unknown: bool = False) -> list[str]:
    """Columns of the predictions CSV for ``k`` top classes: ``path``, the ``task``'s columns
    (single-label: ``label``, ``probability``; multi-label: ``labels`` and one ``p_<class>``
    probability column per class), ``top<i>_label``/``top<i>_probability``, with ``unknown``
    ``unknown``/``unknown_score``, then ``error``."""
    header = ["path", *task.csv_columns(class_names)]
    for i in range(1, k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    return header + (["unknown", "unknown_score"] if unknown else []) + ["error"]


def csv_cells(row: dict[str, Any], k: int, class_names: Sequence[str], delim: str = " ",
              spreadsheet: bool = False, *, task: Task, unknown: bool = False) -> list[str]:
    """A row as CSV cells under :func:`csv_header` (multi-label: labels joined by ``delim``;
    ``spreadsheet``: cells that would run as formulas get a leading ``'``, ``--csv-safe``)."""
    cells = [row["path"], *task.csv_cells(row, class_names, delim)]
    for i in range(k):
        top = row["top_k"][i] if i < len(row["top_k"]) else None
        cells += [top["label"], f"{top['probability']:.6f}"] if top else ["", ""]
    if unknown:
        cells += ([str(row["unknown"]).lower(), f"{row['unknown_score']:.6g}"] if "unknown" in row else ["", ""])
    cells.append(row["error"])
    return [spreadsheet_safe(c) for c in cells] if spreadsheet else cells
