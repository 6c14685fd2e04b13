"""Logits -> prediction rows, defined once for ``predict``, bulk predict, ``evaluate`` and ``serve``.

A row is ``{"path", "label", "probability", "top_k": [{"label", "probability"}], "calibrated",
"error"}``: probabilities are ``softmax(logits / temperature)`` (the calibration stored in
model.json), ``top_k`` lists the k most probable classes, and with ``reject_below=P`` the label
is ``unknown`` when the top probability is below P (``top_k`` still lists the classes). An
unreadable input gets a row with its ``error`` and no label.

A multi-label model's row has ``labels`` (every class whose probability ``sigmoid(logit / T)``
reaches its threshold, possibly none) and ``scores`` (each class's probability) in place of
``label`` and ``probability``; ``top_k`` is the same ranking.

Example:
    >>> rows = prediction_rows(torch.tensor([[2.0, 0.0]]), ["ant", "bee"], top_k=1)
    >>> rows[0]["label"], round(rows[0]["probability"], 3)
    ('ant', 0.881)
    >>> csv_cells(rows[0], 1)
    ['', 'ant', '0.880797', 'ant', '0.880797', '']
    >>> multi = prediction_rows(torch.tensor([[2.0, -1.0]]), ["ant", "bee"], top_k=1, thresholds=[0.5, 0.2])
    >>> multi[0]["labels"], round(multi[0]["scores"]["bee"], 3)
    (['ant', 'bee'], 0.269)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..core.safe_io import spreadsheet_safe

UNKNOWN = "unknown"  # label of predictions rejected by reject_below


def probabilities(logits: torch.Tensor, temperature: float = 1.0, multi_label: bool = False) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension, or for a multi-label model each
    logit's ``sigmoid(logit / temperature)`` (float32, or float64 if given)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if multi_label:
        return torch.sigmoid(logits / float(temperature))
    return torch.softmax(logits / float(temperature), dim=-1)


def error_row(path: str, error: str, calibrated: bool = False, multi_label: bool = False) -> dict[str, Any]:
    """The row of an input that could not be read."""
    if multi_label:
        return {"path": path, "labels": [], "scores": {}, "top_k": [], "calibrated": calibrated, "error": error}
    return {"path": path, "label": "", "probability": None, "top_k": [], "calibrated": calibrated, "error": error}


def _ranking(probs: torch.Tensor, class_names: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    values, idx = probs.topk(max(1, min(top_k, len(class_names))))
    return [{"label": class_names[i], "probability": float(v)} for v, i in zip(values.tolist(), idx.tolist())]


def row_from_probabilities(probs: torch.Tensor, class_names: Sequence[str], top_k: int = 5,
                           reject_below: float | None = None, calibrated: bool = False,
                           path: str = "") -> dict[str, Any]:
    """One row from a probability vector ``[C]``."""
    top = _ranking(probs, class_names, top_k)
    label = top[0]["label"]
    if reject_below is not None and top[0]["probability"] < reject_below:
        label = UNKNOWN
    return {"path": path, "label": label, "probability": top[0]["probability"], "top_k": top,
            "calibrated": calibrated, "error": ""}


def multi_label_row(probs: torch.Tensor, class_names: Sequence[str], thresholds: Sequence[float], top_k: int = 5,
                    calibrated: bool = False, path: str = "") -> dict[str, Any]:
    """One multi-label row from per-label probabilities ``[C]`` and their decision thresholds."""
    values = probs.tolist()
    return {"path": path, "labels": [n for n, p, t in zip(class_names, values, thresholds) if p >= t],
            "scores": dict(zip(class_names, values)), "top_k": _ranking(probs, class_names, top_k),
            "calibrated": calibrated, "error": ""}


def prediction_rows(logits: torch.Tensor, class_names: Sequence[str], temperature: float = 1.0, top_k: int = 5,
                    reject_below: float | None = None, calibrated: bool = False,
                    paths: Sequence[str] | None = None, thresholds: Sequence[float] | None = None
                    ) -> list[dict[str, Any]]:
    """One row per row of ``logits`` ``[N, C]``; ``thresholds`` (one per class) make multi-label rows."""
    probs = probabilities(logits, temperature, multi_label=thresholds is not None)
    paths = paths if paths is not None else [""] * len(probs)
    if thresholds is not None:
        return [multi_label_row(p, class_names, thresholds, top_k, calibrated, path) for p, path in zip(probs, paths)]
    return [row_from_probabilities(p, class_names, top_k, reject_below, calibrated, path)
            for p, path in zip(probs, paths)]


def csv_header(k: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Columns of the predictions CSV for ``k`` top classes; with ``class_names`` a multi-label
    model's: ``labels`` and one ``p_<class>`` probability column per class."""
    header = ["path", "label", "probability"] if class_names is None else ["path", "labels",
                                                                             *(f"p_{n}" for n in class_names)]
    for i in range(1, k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    return header + ["error"]


def csv_cells(row: dict[str, Any], k: int, class_names: Sequence[str] | None = None, delim: str = " ",
              spreadsheet: bool = False) -> list[str]:
    """A row as CSV cells under :func:`csv_header` (multi-label: labels joined by ``delim``;
    ``spreadsheet``: cells that would run as formulas get a leading ``'``, ``--csv-safe``)."""
    cells = _cells(row, k, class_names, delim)
    return [spreadsheet_safe(c) for c in cells] if spreadsheet else cells


def _cells(row: dict[str, Any], k: int, class_names: Sequence[str] | None, delim: str) -> list[str]:
    if class_names is None:
        cells = [row["path"], row["label"], "" if row["probability"] is None else f"{row['probability']:.6f}"]
    else:
        scores = row["scores"]
        cells = [row["path"], delim.join(row["labels"]),
                 *(f"{scores[n]:.6f}" if n in scores else "" for n in class_names)]
    for i in range(k):
        top = row["top_k"][i] if i < len(row["top_k"]) else None
        cells += [top["label"], f"{top['probability']:.6f}"] if top else ["", ""]
    return cells + [row["error"]]
