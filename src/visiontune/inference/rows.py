"""Logits -> prediction rows, defined once for ``predict``, bulk predict, ``evaluate`` and ``serve``.

A row is ``{"path", "label", "probability", "top_k": [{"label", "probability"}], "calibrated",
"error"}``: probabilities are ``softmax(logits / temperature)`` (the calibration stored in
model.json), ``top_k`` lists the k most probable classes, and with ``reject_below=P`` the label
is ``unknown`` when the top probability is below P (``top_k`` still lists the classes). An
unreadable input gets a row with its ``error`` and no label.

Example:
    >>> rows = prediction_rows(torch.tensor([[2.0, 0.0]]), ["ant", "bee"], top_k=1)
    >>> rows[0]["label"], round(rows[0]["probability"], 3)
    ('ant', 0.881)
    >>> csv_cells(rows[0], 1)
    ['', 'ant', '0.880797', 'ant', '0.880797', '']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

UNKNOWN = "unknown"  # label of predictions rejected by reject_below


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension (float32, or float64 if given)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(logits / float(temperature), dim=-1)


def error_row(path: str, error: str, calibrated: bool = False) -> dict[str, Any]:
    """The row of an input that could not be read."""
    return {"path": path, "label": "", "probability": None, "top_k": [], "calibrated": calibrated, "error": error}


def row_from_probabilities(probs: torch.Tensor, class_names: Sequence[str], top_k: int = 5,
                           reject_below: float | None = None, calibrated: bool = False,
                           path: str = "") -> dict[str, Any]:
    """One row from a probability vector ``[C]``."""
    values, idx = probs.topk(max(1, min(top_k, len(class_names))))
    top = [{"label": class_names[i], "probability": float(v)} for v, i in zip(values.tolist(), idx.tolist())]
    label = top[0]["label"]
    if reject_below is not None and top[0]["probability"] < reject_below:
        label = UNKNOWN
    return {"path": path, "label": label, "probability": top[0]["probability"], "top_k": top,
            "calibrated": calibrated, "error": ""}


def prediction_rows(logits: torch.Tensor, class_names: Sequence[str], temperature: float = 1.0, top_k: int = 5,
                    reject_below: float | None = None, calibrated: bool = False,
                    paths: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per row of ``logits`` ``[N, C]``."""
    probs = probabilities(logits, temperature)
    paths = paths if paths is not None else [""] * len(probs)
    return [row_from_probabilities(p, class_names, top_k, reject_below, calibrated, path)
            for p, path in zip(probs, paths)]


def csv_header(k: int) -> list[str]:
    """Columns of the predictions CSV for ``k`` top classes."""
    header = ["path", "label", "probability"]
    for i in range(1, k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    return header + ["error"]


def csv_cells(row: dict[str, Any], k: int) -> list[str]:
    """A row as CSV cells under :func:`csv_header`."""
    cells = [row["path"], row["label"], "" if row["probability"] is None else f"{row['probability']:.6f}"]
    for i in range(k):
        top = row["top_k"][i] if i < len(row["top_k"]) else None
        cells += [top["label"], f"{top['probability']:.6f}"] if top else ["", ""]
    return cells + [row["error"]]
