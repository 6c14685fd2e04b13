"""Deploy-ready exports (ONNX, TorchScript, timm/HF layout) with verified parity, and compression.

Every export is checked against eager fp32 PyTorch right after it is written (top-1 agreement
and max |logit diff| on validation or generated images) and refused when it disagrees.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .common import MAX_LOGIT_DIFF, MIN_AGREEMENT, ExportError, check_parity, compare_logits, eager_logits, \
    export_meta, parity_batch, parity_problems, write_json

# format -> (writer(model, meta, out, opset=, dynamic_batch=) -> file, default file name)
EXPORTERS: dict[str, tuple[Callable[..., Path], str]] = {}
# format -> logits(file, meta, batch) for the parity check, loading the file the way a user would
PARITY_RUNNERS: dict[str, Callable[..., Any]] = {}


def _register() -> None:
    from .hf_export import export_hf, hf_logits
    from .onnx_export import export_onnx, onnx_session, session_logits
    from .torchscript_export import export_torchscript, torchscript_logits

    EXPORTERS.update({"onnx": (export_onnx, "model.onnx"), "torchscript": (export_torchscript, "model.pt"),
                      "hf": (export_hf, "model.safetensors")})
    PARITY_RUNNERS.update({
        "onnx": lambda path, meta, batch: session_logits(onnx_session(path), batch.numpy()),
        "torchscript": lambda path, meta, batch: torchscript_logits(path, batch),
        "hf": lambda path, meta, batch: hf_logits(path, meta, batch),
    })


_register()


def default_out(model_dir: str | os.PathLike, fmt: str) -> Path:
    """``RUN/export/FORMAT/FILE`` next to the run's ``model/`` dir."""
    return Path(model_dir).parent / "export" / fmt / EXPORTERS[fmt][1]


def export_model(model_path: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None,
                 opset: int = 17, dynamic_batch: bool = False, data: str | os.PathLike | None = None,
                 parity_images: int = 64, check: bool = True) -> dict[str, Any]:
    """Export a trained model, verify it against eager PyTorch and write ``export_report.json``.

    Args:
        model_path: run dir or ``model/`` dir.
        fmt: a key of :data:`EXPORTERS` (``onnx``, ``torchscript``, ``hf``).
        out: output file (folder for ``hf``); default ``RUN/export/FORMAT/``.
        opset: ONNX opset; dynamic_batch: dynamic batch dimension (ONNX).
        data: labelled images for the parity check (default: the model's validation split,
            else generated images).
        check: raise :class:`ExportError` when parity is below the thresholds.

    Returns:
        The report: ``file``, ``format``, ``top1_agreement``, ``max_abs_logit_diff``, ``passed``...

    Example:
        >>> export_model("runs/train-1", "onnx", dynamic_batch=True)["top1_agreement"]  # doctest: +SKIP
        1.0
    """
    from ..models.artifact import load_model

    if fmt not in EXPORTERS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(EXPORTERS)}")
    model, meta = load_model(model_path)
    writer, _ = EXPORTERS[fmt]
    target = Path(out) if out else default_out(meta["model_dir"], fmt)
    written = writer(model, meta, target, opset=opset, dynamic_batch=dynamic_batch)
    folder = written.parent
    extra = {"opset": opset, "dynamic_batch": dynamic_batch} if fmt == "onnx" else {}
    write_json(folder / "model.json", export_meta(meta, fmt, written.name, **extra))
    batch, source = parity_batch(meta, data, parity_images)
    report = {"format": fmt, "file": str(written), "source": source,
              **compare_logits(eager_logits(model, batch), PARITY_RUNNERS[fmt](written, meta, batch)),
              "thresholds": {"min_top1_agreement": MIN_AGREEMENT, "max_abs_logit_diff": MAX_LOGIT_DIFF}}
    report["passed"] = not parity_problems(report)
    write_json(folder / "export_report.json", report)
    if check:
        check_parity(report)
    return report


__all__ = ["EXPORTERS", "ExportError", "export_model"]
