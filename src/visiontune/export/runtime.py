"""Measure, verify and cache the fastest CPU runtime of a model: eager PyTorch, ONNX Runtime or OpenVINO.

Run once per model and machine, before ``predict``/``evaluate``/``serve`` load the model with
``backend="auto"``: the model is exported to ONNX (dynamic batch) and converted to OpenVINO in the
user cache (:func:`~visiontune.inference.accelerated.runtime_dir`), each graph's logits are
compared with eager fp32 PyTorch on validation images (the export parity check: 99.5% top-1
agreement and 2e-4 of the logits' scale), and eager (at the requested precision) and every
verified graph are timed at batch 32. The fastest is recorded in ``choice.json``; any failure
records eager with its reason, so a model that cannot be exported costs the attempt once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.safe_io import atomic_write_text
from ..inference.accelerated import BACKENDS, CHOICE_FILE, GRAPH_FILES, accelerates, cpu_kind, read_choice, runtime_dir
from ..inference.classifier import Classifier
from ..inference.runners import TorchRunner, is_graph
from ..models.artifact import load_model, resolve_model_dir
from .common import compare_logits, eager_logits, parity_batch, parity_problems
from .compare import Logits, onnx_runner, openvino_runner, tile, time_per_call
from .onnx_export import export_onnx

TIMING_BATCH = 32
TIMING_BUDGET_S = 0.5  # per candidate (at least 3 calls): medians are stable to a few percent


def prepare_runtime(model_path: str | os.PathLike, precision: str = "auto",
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The recorded runtime choice of a PyTorch model folder, measuring it first if needed.

    Returns ``{"backend": "eager"|"onnxruntime"|"openvino", "verified": [...], "images_per_s_b32":
    {...}, "parity": {...}, "problems": {...}}``; on a GPU or at an explicit reduced precision,
    ``{"backend": "eager", ...}`` without measuring.

    Example:
        prepare_runtime("runs/train-1")["backend"]
        # -> 'openvino'
    """
    model_dir = resolve_model_dir(model_path)
    if not accelerates(precision):
        return {"backend": "eager", "verified": [],
                "reason": "a GPU, or an explicit reduced precision, runs eager PyTorch"}
    folder = runtime_dir(model_dir, precision)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _locked(folder.with_name(folder.name + ".lock")):  # one measurement at a time per model
            return _prepare(model_dir, precision, folder, log)
    except OSError as exc:  # an unwritable cache never stops a command: eager, said once
        log(f"runtime: the cache {folder.parent} is not writable ({exc.strerror or exc}); running eager "
            "PyTorch (set VISIONTUNE_CACHE to a writable folder)")
        return {"backend": "eager", "verified": [], "reason": f"cache not writable: {exc}"}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: parallel commands (serve workers, jobs) measure a model once, not at
    the same time on the same cores, which would spoil each other's timings."""
    import fcntl  # POSIX; elsewhere measurements are simply not serialised

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare(model_dir: Path, precision: str, folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    choice = read_choice(folder)
    if choice is not None:  # measured before (or by the process that held the lock)
        log(_describe(choice) + (" (measured before)" if choice.get("images_per_s_b32") else ""))
        return choice
    log("runtime: measuring eager PyTorch, ONNX Runtime and OpenVINO on this CPU once for this model "
        f"(cached in {folder})")
    for old in folder.parent.glob(folder.name + ".tmp-*"):  # left by a killed measurement
        shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        choice = _measure(model_dir, precision, stage)
    except Exception as exc:  # any failure: eager, recorded with its reason, never a lost command
        choice = {"backend": "eager", "verified": [], "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    choice["cpu"] = cpu_kind()
    atomic_write_text(stage / CHOICE_FILE, json.dumps(choice, indent=1) + "\n")
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)  # a damaged record of ours (a valid one returned above)
    stage.rename(folder)
    log(_describe(choice))
    return read_choice(folder) or choice


def _measure(model_dir: Path, precision: str, stage: Path) -> dict[str, Any]:
    model, card = load_model(model_dir)
    batch, source = parity_batch(card, None, TIMING_BATCH)
    reference = eager_logits(model, batch, tta=card.tta)
    timed = tile(batch.numpy(), TIMING_BATCH)
    eager = TorchRunner(model, precision, card.preprocessing.height, card.tta)
    runs: dict[str, Logits] = {"eager": lambda b: eager(torch.from_numpy(b)).numpy()}
    parity: dict[str, Any] = {}
    problems: dict[str, str] = {}
    onnx_path = export_onnx(model.float(), card, stage / GRAPH_FILES["onnxruntime"], dynamic_batch=True)
    runs["onnxruntime"] = onnx_runner(onnx_path)
    try:
        from .openvino_export import onnx_to_openvino  # OpenVINO is optional: ORT alone then

        runs["openvino"] = openvino_runner(onnx_to_openvino(onnx_path, stage / GRAPH_FILES["openvino"]))
    except Exception as exc:
        problems["openvino"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    verified = []
    for name in [n for n in runs if n != "eager"]:
        parity[name] = compare_logits(reference, runs[name](batch.numpy()), card)
        failed = parity_problems(parity[name])
        if failed:
            problems[name] = "; ".join(failed)
        else:
            verified.append(name)
    seconds = {name: time_per_call(runs[name], timed, TIMING_BUDGET_S) for name in ["eager", *verified]}
    fastest = min(seconds, key=seconds.get)
    return {"backend": fastest, "verified": verified, "precision": precision, "parity_source": source,
            "images_per_s_b32": {k: round(TIMING_BATCH / v, 1) for k, v in seconds.items()},
            "parity": parity, "problems": problems, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _describe(choice: dict[str, Any]) -> str:
    speeds = choice.get("images_per_s_b32") or {}
    line = f"runtime: {choice['backend']}"
    if speeds:
        line += " (" + ", ".join(f"{k} {v:g} img/s" for k, v in sorted(speeds.items(), key=lambda kv: -kv[1])) + \
                " at batch 32, verified against eager fp32)"
    if choice.get("reason"):
        line += f"; eager because {choice['reason']}"
    return line


def load_classifier(path: str | os.PathLike, precision: str = "auto", tta: bool | None = None,
                    backend: str = "auto", log: Callable[[str], None] = print) -> Classifier:
    """:meth:`Classifier.load` after :func:`prepare_runtime` (``backend`` other than ``eager``, on a
    PyTorch model folder): what ``predict``, ``evaluate`` and ``serve`` load.

    Example:
        clf = load_classifier("runs/train-1")  # the fastest verified runtime on this CPU
    """
    prepare_for(path, precision, backend, log)
    return Classifier.load(path, precision, tta, backend)


def prepare_for(path: str | os.PathLike, precision: str = "auto", backend: str = "auto",
                log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """:func:`prepare_runtime` when ``backend`` asks for it on a model folder; says when a named
    runtime failed verification (the model then runs eagerly)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "eager" or is_graph(path):
        return None
    choice = prepare_runtime(path, precision, log)
    if backend != "auto" and backend not in choice.get("verified", []):
        why = (choice.get("problems") or {}).get(backend) or choice.get("reason", "not measured")
        log(f"runtime: {backend} is not verified for this model ({why}); running eager PyTorch")
    return choice
