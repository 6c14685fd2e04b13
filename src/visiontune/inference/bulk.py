"""Bulk prediction: streamed, written incrementally, resumable, sharded over processes.

A folder of a million files never needs a million decoded images in memory: inputs are decoded
batch by batch, and each row is appended to the output as soon as it is known. ``resume``
skips the rows an interrupted run already wrote (output order = input order).
"""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.errors import DataError
from ..core.hardware import cpu_count
from ..core.safe_io import spreadsheet_safe
from ..data.csvfile import csv_rows, read_text
from ..models.artifact import read_card, resolve_model_dir
from ..models.card import ModelCard
from .classifier import Classifier
from .rows import csv_cells, csv_header
from .runners import is_graph, load_graph


def rows_done(out: Path, inputs: Sequence[str], header: list[str], spreadsheet: bool = False) -> int:
    """Rows an interrupted run already wrote to ``out`` for the first of ``inputs``.

    Rows are read with the data layer's CSV reader (a quoted file name may hold a newline; a
    byte that is not UTF-8, a NUL or a huge cell is a :class:`DataError` naming the line), the
    columns must be the ones this call writes and each row's path must be the input at its
    position; a row the interruption cut off is dropped from the file.
    """
    if not out.exists():
        return 0
    text = read_text(out)  # bytes that are not UTF-8 kept: the cut-off row may end inside a character
    complete = text[: text.rfind("\n") + 1]  # every row ends with a newline: a cut row lacks it
    try:
        rows = [row for _, row in csv_rows(io.StringIO(complete), str(out), comments=False)]  # a path may start with #
    except DataError as exc:
        raise DataError(f"--resume: {exc}; or give a new --out, or drop --resume") from None
    if not rows:
        return 0
    if rows[0] != header:
        raise DataError(f"--resume: {out} has other columns than this prediction writes (another model, --top-k "
                        "or task?); give a new --out or drop --resume")
    done = 0
    for row in rows[1:]:
        if len(row) != len(header):
            break  # a row split by an interruption inside a quoted cell
        expected = str(inputs[done]) if done < len(inputs) else None
        if expected is None or row[0] != (spreadsheet_safe(expected) if spreadsheet else expected):
            raise DataError(f"--resume: row {done + 1} of {out} is for {row[0]!r} but input {done + 1} is "
                            f"{expected!r}: the inputs changed since that run; give a new --out or drop --resume")
        done += 1
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows[:done + 1])
    if buf.getvalue() != text:  # a cut-off row (even one the csv module read whole): rewritten without it
        with open(out, "w", newline="", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
    return done


def predict_to_csv(model_path: str, inputs: Sequence[str], out: Path, top_k: int = 5, batch_size: int = 64,
                   workers: int | None = None, precision: str = "auto", reject_below: float | None = None,
                   resume: bool = False, processes: int = 1, threshold: float | None = None,
                   label_delim: str = " ", csv_safe: bool = False, backend: str = "eager",
                   unknown_tpr: float | None = None) -> tuple[int, int]:
    """Predict ``inputs`` into CSV ``out``; returns (rows written in this call, unreadable among them).

    ``threshold`` and ``label_delim`` apply to multi-label models (one threshold for every label,
    the separator of the ``labels`` cell); ``csv_safe`` prefixes cells that a spreadsheet would
    run as formulas with ``'``; ``unknown_tpr`` moves the unknown-score's threshold
    (:meth:`Classifier.move_unknown_threshold`). ``backend`` is :meth:`Classifier.load`'s for one process; a model
    folder sharded over ``processes`` runs eagerly (a runtime session would use every core).

    Example:
        predict_to_csv("runs/train-1", files, Path("preds.csv"), resume=True)
    """
    done = 0
    if resume:
        card = _card(model_path)  # its columns: the classes and the task (the weights load once, below)
        k = max(1, min(top_k, card.num_classes))
        done = rows_done(out, inputs, csv_header(k, card.class_names, task=card.task, unknown=card.unknown is not None),
                         csv_safe)
    # predicting restarts at the batch boundary before the first missing row and writes from that
    # row on: every batch holds the same images as in the first run, so the numbers are bit-identical
    # (a batch of other images may take other float kernels: the last digit of a score moved)
    if resume and done == len(inputs):
        return 0, 0  # every row is there
    start = done - done % batch_size
    todo, skip = list(inputs[start:]), done - start
    decision = (reject_below, threshold, label_delim, csv_safe, unknown_tpr)
    if processes <= 1 or len(todo) < processes * batch_size:
        return _predict_shard(model_path, todo, out, top_k, batch_size, workers, precision, decision, done > 0,
                              backend=backend, skip=skip)
    return _predict_sharded(model_path, todo, out, top_k, batch_size, precision, decision, done > 0, processes,
                            skip)


def _card(model_path: str) -> ModelCard:
    """The model's card without its weights (an exported graph's from its metadata)."""
    if is_graph(model_path):
        return load_graph(model_path)[1]
    return read_card(resolve_model_dir(model_path))


def _predict_shard(model_path, inputs, out: Path, top_k, batch_size, workers, precision, decision: tuple,
                   append: bool, threads: int | None = None, backend: str = "eager", skip: int = 0
                   ) -> tuple[int, int]:
    """Predict ``inputs`` into ``out``; the first ``skip`` rows are predicted (for their batch) but
    not written: they are there already."""
    if threads:
        torch.set_num_threads(threads)
    clf = Classifier.load(model_path, precision=precision, backend=backend)
    reject_below, threshold, delim, spreadsheet, unknown_tpr = decision
    clf.move_unknown_threshold(unknown_tpr)
    k = max(1, min(top_k, len(clf.class_names)))
    names, task, unknown = clf.class_names, clf.task, clf.unknown_threshold is not None
    written = bad = 0
    with open(out, "a" if append else "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if not append:
            writer.writerow(csv_header(k, names, task=task, unknown=unknown))
        for i, row in enumerate(clf.predict_stream(inputs, top_k, batch_size, workers, reject_below, threshold)):
            if i < skip:
                continue
            writer.writerow(csv_cells(row, k, names, delim, spreadsheet, task=task, unknown=unknown))
            written += 1
            bad += bool(row["error"])
            if written % batch_size == 0:
                fh.flush()
    return written, bad


def _predict_sharded(model_path, inputs, out: Path, top_k, batch_size, precision, decision: tuple, append: bool,
                     processes: int, skip: int = 0) -> tuple[int, int]:
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
                                                  batch_size, 0, precision, decision, False, threads, "eager",
                                                  skip if i == 0 else 0))
                for i in range(processes)]
        counts = [job.get() for job in jobs]
    written, bad = sum(c[0] for c in counts), sum(c[1] for c in counts)
    with open(out, "ab" if append else "wb") as fh:
        for i, part in enumerate(parts):
            lines = part.read_bytes().splitlines(keepends=True)
            fh.writelines(lines if (i == 0 and not append) else lines[1:])
            part.unlink()
    return written, bad
