"""``visiontune export``: write one format, verify it against eager PyTorch, report.

Each format (:data:`~visiontune.export.registry.EXPORT_FORMATS`) is a :class:`Format`: a writer
and a ``logits`` function that loads the written file the way a user would, for the parity check.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ExportError
from ..core.layout import RunLayout
from ..models.artifact import META_FILE, load_model
from ..models.card import ModelCard
from .deploy import export_card, write_json
from .parity import (
    MAX_LOGIT_DIFF,
    MIN_AGREEMENT,
    check_parity,
    compare_logits,
    eager_logits,
    parity_problems,
    unknown_parity,
)
from .registry import EXPORT_FORMATS
from .samples import parity_batch

GRAPH_FORMATS = ("onnx", "openvino")  # exported graphs: opset, dynamic batch, --input-dtype uint8


@dataclass(frozen=True)
class Format:
    """An export format: ``write(model, card, out, opset=, dynamic_batch=) -> file`` and
    ``logits(file, card, batch) -> array`` for the parity check."""

    write: Callable[..., Path]
    logits: Callable[[Path, ModelCard, torch.Tensor], np.ndarray]
    file_name: str


def default_out(model_dir: str | os.PathLike, fmt: str) -> Path:
    """``RUN/export/FORMAT/FILE`` next to the run's ``model/`` dir."""
    return RunLayout.of_model_dir(model_dir).root / "export" / fmt / EXPORT_FORMATS.get(fmt).file_name


def export_model(model_path: str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None,
                 opset: int = 17, dynamic_batch: bool = False, data: str | os.PathLike | None = None,
                 parity_images: int = 64, input_dtype: str = "float32", check: bool = True,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export a trained model, verify it against eager PyTorch and write ``export_report.json``.

    Args:
        model_path: run dir or ``model/`` dir.
        format: a name in :data:`~visiontune.export.registry.EXPORT_FORMATS` (``onnx``, ``openvino``,
            ``torchscript``, ``hf``).
        out: output file (folder for ``hf``); default ``RUN/export/FORMAT/``.
        opset: ONNX opset; dynamic_batch: dynamic batch dimension (ONNX, OpenVINO).
        data: labelled images for the parity check (default: the model's validation split,
            else generated images).
        input_dtype: ONNX and OpenVINO: ``float32`` (normalised NCHW) or ``uint8`` (resized NHWC pixels,
            normalised inside the graph); parity-checked the same way.
        check: raise :class:`ExportError` when parity is below the thresholds (after ``log``).
        log: where to say what was written and how it compares with eager (None: silent).

    The options are :class:`~visiontune.export.export_options.ExportOptions` (``visiontune export``'s flags).

    Returns:
        The report: ``file``, ``format``, ``top1_agreement``, ``max_abs_logit_diff``, ``passed``...

    Example:
        export_model("runs/train-1", "onnx", dynamic_batch=True)["top1_agreement"]
        # -> 1.0
    """
    fmt = format
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    graph = fmt in GRAPH_FORMATS
    if input_dtype != "float32" and not graph:
        raise ExportError(f"--input-dtype {input_dtype} is for --format {' or '.join(GRAPH_FORMATS)}; {fmt} takes "
                          "float32 input")
    exporter: Format = EXPORT_FORMATS.get(fmt)
    model, card = load_model(model_path)
    target = Path(out) if out else default_out(card.model_dir, fmt)
    options = {"input_dtype": input_dtype} if graph else {}
    written = exporter.write(model, card, target, opset=opset, dynamic_batch=dynamic_batch, **options)
    folder = written.parent
    extra = {"opset": opset, "dynamic_batch": dynamic_batch, **options} if graph else {}
    write_json(folder / META_FILE, export_card(card, fmt, written.name, **extra).to_dict())
    batch, source = parity_batch(card, data, parity_images)
    report = {"format": fmt, "file": str(written), "source": source,
              **compare_logits(eager_logits(model, batch, tta=card.tta if fmt != "hf" else None),
                               exporter.logits(written, card, batch), card),
              **unknown_parity(model, card, written, batch),
              "thresholds": {"min_top1_agreement": MIN_AGREEMENT, "max_rel_logit_diff": MAX_LOGIT_DIFF}}
    report["passed"] = not parity_problems(report)
    write_json(folder / "export_report.json", report)
    if log is not None:  # before the check, so that failing numbers are visible
        task = card.task
        log(f"exported {fmt}: {written}")
        log(f"parity vs eager fp32 on {source}: {task.agreement_words} {report[task.agreement_key]:.2%}, max |logit "
            f"diff| {report['max_abs_logit_diff']:.2e} ({report['max_rel_logit_diff']:.1e} of the logits' scale)"
            + (f", unknown decisions {report['unknown_agreement']:.2%}" if "unknown_agreement" in report else ""))
    if check:
        check_parity(report)
    return report
