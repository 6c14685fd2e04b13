"""Bulk prediction: streamed, written incrementally, resumable, sharded over processes.

A folder of a million files never needs a million decoded images in memory: inputs are decoded
batch by batch, and each row is appended to the output as soon as it is known. ``resume``
skips the rows an interrupted run already wrote (output order = input order).
"""

from __future__ import annotations

import csv
import multiprocessing as mp
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.hardware import cpu_count
from .classifier import Classifier
from .rows import csv_cells, csv_header


def rows_done(out: Path) -> int:
    """Complete data rows already in ``out`` (a cut-off last line does not count)."""
    if not out.exists():
        return 0
    text = out.read_text()
    complete = text[: text.rfind("\n") + 1]
    out.write_text(complete)  # drop a half-written last row
    return max(0, complete.count("\n") - 1)


def predict_to_csv(model_path: str, inputs: Sequence[str], out: Path, top_k: int = 5, batch_size: int = 64,
                   workers: int | None = None, precision: str = "auto", reject_below: float | None = None,
                   resume: bool = False, processes: int = 1, threshold: float | None = None,
                   label_delim: str = " ") -> tuple[int, int]:
    """Predict ``inputs`` into CSV ``out``; returns (rows written in this call, unreadable among them).

    ``threshold`` and ``label_delim`` apply to multi-label models (one threshold for every label,
    the separator of the ``labels`` cell).

    Example:
        predict_to_csv("runs/train-1", files, Path("preds.csv"), resume=True)
    """
    done = rows_done(out) if resume else 0
    todo = list(inputs[done:])
    decision = (reject_below, threshold, label_delim)
    if processes <= 1 or len(todo) < processes * batch_size:
        return _predict_shard(model_path, todo, out, top_k, batch_size, workers, precision, decision, done > 0)
    return _predict_sharded(model_path, todo, out, top_k, batch_size, precision, decision, done > 0, processes)


def _predict_shard(model_path, inputs, out: Path, top_k, batch_size, workers, precision, decision: tuple,
                   append: bool, threads: int | None = None) -> tuple[int, int]:
    if threads:
        torch.set_num_threads(threads)
    clf = Classifier.load(model_path, precision=precision)
    reject_below, threshold, delim = decision
    k = max(1, min(top_k, len(clf.class_names)))
    names = clf.class_names if clf.multi_label else None
    written = bad = 0
    with open(out, "a" if append else "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if not append:
            writer.writerow(csv_header(k, names))
        for row in clf.predict_stream(inputs, top_k, batch_size, workers, reject_below, threshold):
            writer.writerow(csv_cells(row, k, names, delim))
            written += 1
            bad += bool(row["error"])
            if written % batch_size == 0:
                fh.flush()
    return written, bad


def _predict_sharded(model_path, inputs, out: Path, top_k, batch_size, precision, decision: tuple, append: bool,
                     processes: int) -> tuple[int, int]:
    """Contiguous shards in ``processes`` processes, then parts appended to ``out`` in order."""
    # shard boundaries on batch boundaries: every batch holds the same images as in one process,
    # so the numbers are bit-identical
    size = -(-len(inputs) // processes)
    size = -(-size // batch_size) * batch_size
    parts = [out.with_name(f".{out.name}.part{i}") for i in range(processes)]
    threads = max(1, cpu_count() // processes)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        jobs = [pool.apply_async(_predict_shard, (model_path, inputs[i * size:(i + 1) * size], parts[i], top_k,
                                                  batch_size, 0, precision, decision, False, threads))
                for i in range(processes)]
        counts = [job.get() for job in jobs]
    written, bad = sum(c[0] for c in counts), sum(c[1] for c in counts)
    with open(out, "ab" if append else "wb") as fh:
        for i, part in enumerate(parts):
            lines = part.read_bytes().splitlines(keepends=True)
            fh.writelines(lines if (i == 0 and not append) else lines[1:])
            part.unlink()
    return written, bad
