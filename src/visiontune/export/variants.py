"""Side-by-side comparison of model variants: size, latency, throughput, accuracy, agreement.

A *variant* is a name, the file(s) it lives in and a ``logits(batch: np.ndarray) -> np.ndarray``
function; everything is measured on the same preprocessed validation tensor, so the numbers
differ only by the model/runtime, never by decoding.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.safe_io import atomic_write_text
from ..core.tables import fixed_width, markdown
from ..inference.runners import TorchRunner, compiled_logits, onnx_session, openvino_compile, session_logits
from .parity import ValScore
from .samples import file_size_mb

Logits = Callable[[np.ndarray], np.ndarray]


@dataclass
class Variant:
    name: str
    path: str
    logits: Logits
    extra: dict[str, Any] = field(default_factory=dict)


def torch_runner(model: nn.Module, tta: bool | str | None = None) -> Logits:
    """Eager fp32 PyTorch as :class:`Classifier` runs it on CPU (channels_last, inference mode)."""
    runner = TorchRunner(copy.deepcopy(model).float(), precision="32", tta=tta)  # the caller's model stays put
    return lambda batch: runner(torch.from_numpy(batch)).numpy()


def onnx_runner(path: str | Path) -> Logits:
    session = onnx_session(path)
    return lambda batch: session_logits(session, batch, chunk=len(batch))


def openvino_runner(path: str | Path) -> Logits:
    compiled, _ = openvino_compile(path)
    return lambda batch: compiled_logits(compiled, batch, chunk=len(batch))


def batched_logits(run: Logits, images: np.ndarray, chunk: int = 32) -> np.ndarray:
    return np.concatenate([run(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def time_per_call(run: Logits, batch: np.ndarray, budget_s: float = 3.0, min_runs: int = 3) -> float:
    """Median seconds per call after one warm-up; stops after ``budget_s`` (at least ``min_runs``)."""
    run(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def tile(images: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n])


def measure(variants: list[Variant], images: np.ndarray, labels: np.ndarray, scorer: ValScore,
            budget_s: float = 3.0, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Val score (the model's task's headline: accuracy, or a multi-label model's macro mAP; ``scorer``),
    agreement with the first variant (eager), size, latency and throughput of each."""
    rows: list[dict[str, Any]] = []
    reference = None
    for v in variants:
        logits = batched_logits(v.logits, images)
        reference = logits if reference is None else reference
        latency = time_per_call(v.logits, tile(images, 1), budget_s)
        per_batch = time_per_call(v.logits, tile(images, 32), budget_s)
        row = {"variant": v.name, "file": v.path, "size_mb": round(file_size_mb(v.path), 3),
               "latency_ms_b1": round(latency * 1e3, 2), "throughput_b32": round(32 / per_batch, 1), **v.extra}
        row.update({scorer.key: scorer.score(logits, labels), scorer.agreement: scorer.agree(logits, reference)})
        log(f"  measured {v.name}: {SHORT_NAMES.get(scorer.key, scorer.name)} {row[scorer.key]:.4f}, "
            f"{row['throughput_b32']} img/s")
        rows.append(row)
    base = rows[0]["throughput_b32"] if rows else 1.0
    for row in rows:
        row["speedup_vs_eager_b32"] = round(row["throughput_b32"] / base, 2)
    return rows


COLUMNS = [("variant", "variant", "{}"), ("size_mb", "size MB", "{:.2f}"),
           ("latency_ms_b1", "latency ms (b1)", "{:.2f}"),
           ("throughput_b32", "img/s (b32)", "{:.1f}"), ("speedup_vs_eager_b32", "x eager", "{:.2f}"),
           ("val_accuracy", "val acc", "{:.4f}"), ("top1_agreement", "agree w/ eager", "{:.4f}"),
           ("val_map", "val mAP", "{:.4f}"), ("label_agreement", "label decisions agree", "{:.4f}"),
           ("macs", "MACs", "{}")]


TASK_COLUMNS = {"val_accuracy", "top1_agreement", "val_map", "label_agreement"}  # shown for the model's task
SHORT_NAMES = {key: title.removeprefix("val ") for key, title, _ in COLUMNS}  # "acc", "mAP": progress lines


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if c[0] not in TASK_COLUMNS or any(c[0] in r for r in rows)]


def _cells(row: dict[str, Any], columns: list[tuple[str, str, str]]) -> list[str]:
    return [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width console table."""
    columns = _columns(rows)
    return fixed_width([title for _, title, _ in columns], [_cells(r, columns) for r in rows])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    return markdown([title for _, title, _ in columns], [_cells(r, columns) for r in rows])


def write_reports(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``compress_report.json`` and ``compress_report.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "compress_report.json", out_dir / "compress_report.md"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    notes = "\n".join(f"- {n}" for n in report.get("notes", []))
    atomic_write_text(md_path, f"# visiontune compress report\n\nmodel: `{report['model']}`  \n"
                       f"validation: {report['num_val']} images ({report['val_source']})  \n"
                       f"machine: {report['machine']}\n\n{markdown_table(report['variants'])}\n\n{notes}\n")
    return json_path, md_path
