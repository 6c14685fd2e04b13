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
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.safe_io import atomic_write_text
from ..inference.accelerated import (
    BACKENDS,
    CHOICE_FILE,
    GRAPH_FILES,
    CacheUnavailable,
    accelerates,
    cpu_kind,
    entry_name,
    open_entry,
    open_root,
    read_choice,
    runtime_key,
    runtimes_root,
)
from ..inference.classifier import Classifier
from ..inference.graph_files import entry_mode
from ..inference.runners import TorchRunner, is_graph
from ..models.artifact import WEIGHTS_FILE, check_weights, load_model, read_card, resolve_model_dir
from ..models.card import ModelCard
from ..models.unknown import score_of
from .onnx_export import export_onnx
from .parity import compare_logits, eager_logits, parity_problems, unknown_parity
from .samples import parity_batch
from .variants import Logits, onnx_runner, openvino_runner, tile, time_per_call

TIMING_BATCH = 32
TIMING_BUDGET_S = 0.5  # per candidate (at least 3 calls): medians are stable to a few percent


LOCK_TIMEOUT_S = 600.0  # a measurement takes seconds to a minute or two; a lock held longer is stuck


def prepare_runtime(model_path: str | os.PathLike, precision: str = "auto",
                    log: Callable[[str], None] = print, lock_timeout: float = LOCK_TIMEOUT_S) -> dict[str, Any]:
    """The recorded runtime choice of a PyTorch model folder, measuring it first if needed.

    Returns ``{"backend": "eager"|"onnxruntime"|"openvino", "verified": [...], "images_per_s_b32":
    {...}, "parity": {...}, "problems": {...}}``; on a GPU or at an explicit reduced precision,
    ``{"backend": "eager", ...}`` without measuring. The model folder is validated before anything
    is hashed or cached (a broken one raises :class:`~visiontune.core.errors.ArtifactError` and
    leaves no entry); a cache that is not this user's own, or a lock held by another measurement
    for ``lock_timeout`` seconds, means eager, said once.

    Example:
        prepare_runtime("runs/train-1")["backend"]
        # -> 'openvino'
    """
    model_dir = resolve_model_dir(model_path)
    if not accelerates(precision):
        return {"backend": "eager", "verified": [],
                "reason": "a GPU, or an explicit reduced precision, runs eager PyTorch"}
    check_weights(model_dir / WEIGHTS_FILE, read_card(model_dir))  # before hashing gigabytes of a crafted file
    key = runtime_key(model_dir, precision)
    try:
        with open_root(create=True) as root_fd:
            with _locked(root_fd, entry_name(key) + ".lock", lock_timeout, log):  # one measurement per model
                return _prepare(model_dir, precision, key, root_fd, log)
    except CacheUnavailable as exc:
        log(f"runtime: {exc}; running eager PyTorch")
        return {"backend": "eager", "verified": [], "reason": str(exc)}
    except OSError as exc:  # an unwritable cache never stops a command: eager, said once
        log(f"runtime: the cache {runtimes_root()} is not writable ({exc.strerror or exc}); running eager "
            "PyTorch (set VISIONTUNE_CACHE to a writable folder)")
        return {"backend": "eager", "verified": [], "reason": f"cache not writable: {exc}"}


@contextlib.contextmanager
def _locked(root_fd: int, name: str, timeout: float, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock file in the cache root: parallel commands (serve workers, jobs) measure a
    model once, not at the same time on the same cores, which would spoil each other's timings.

    Opened without following a link (a planted ``<key>.lock`` link never creates a file elsewhere),
    private to the user; waits at most ``timeout`` seconds, saying so, then gives up
    (:class:`CacheUnavailable`)."""
    import fcntl  # POSIX; elsewhere measurements are simply not serialised

    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, 0o600, dir_fd=root_fd)
    except OSError as exc:
        raise CacheUnavailable(f"cannot open the lock {runtimes_root() / name} ({exc.strerror}); remove it") from None
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheUnavailable(f"another process has held {runtimes_root() / name} for {timeout:g} s; "
                                           "if no visiontune is running, remove that file") from None
                if not waiting:
                    log(f"runtime: waiting for another visiontune measuring this model (lock {runtimes_root() / name})")
                    waiting = True
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _prepare(model_dir: Path, precision: str, key: str, root_fd: int, log: Callable[[str], None]) -> dict[str, Any]:
    name = entry_name(key)
    with open_entry(root_fd, name) as entry_fd:
        choice = read_choice(entry_fd, key)
    if choice is not None:  # measured before (or by the process that held the lock)
        log(_describe(choice) + (" (measured before)" if choice.get("images_per_s_b32") else ""))
        return choice
    model, card = load_model(model_dir)  # a model that does not load fails here, before any entry exists
    root = runtimes_root()
    log(f"runtime: measuring eager PyTorch, ONNX Runtime and OpenVINO on this CPU once for this model "
        f"(cached in {root / name})")
    for old in os.listdir(root_fd):  # left by a killed measurement
        if old.startswith(name + ".tmp-"):
            shutil.rmtree(old, ignore_errors=True, dir_fd=root_fd)
    stage_name = f"{name}.tmp-{secrets.token_hex(4)}"
    os.mkdir(stage_name, 0o700, dir_fd=root_fd)
    stage = root / stage_name
    try:
        choice = _measure(model, card, precision, stage)
    except Exception as exc:  # any failure: eager, recorded with its reason, never a lost command
        choice = {"backend": "eager", "verified": [], "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    choice["key"] = key
    choice["cpu"] = cpu_kind()
    atomic_write_text(stage / CHOICE_FILE, json.dumps(choice, indent=1) + "\n")
    mode = entry_mode(root_fd, name)  # a damaged or stale record of ours, or a planted link
    if mode is not None and stat.S_ISDIR(mode):
        shutil.rmtree(name, dir_fd=root_fd)
    elif mode is not None:
        os.unlink(name, dir_fd=root_fd)
    os.rename(stage_name, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    log(_describe(choice))
    with open_entry(root_fd, name) as entry_fd:
        return read_choice(entry_fd, key) or choice


def _measure(model: torch.nn.Module, card: ModelCard, precision: str, stage: Path) -> dict[str, Any]:
    batch, source = parity_batch(card, None, TIMING_BATCH)
    reference = eager_logits(model, batch, tta=card.tta)
    timed = tile(batch.numpy(), TIMING_BATCH)
    # eager is timed as it predicts: with the unknown-score, which the graphs compute too
    score = score_of(model, card)
    eager = TorchRunner(model, precision, card.preprocessing.height, card.tta, score,
                        card.architecture.classifier if score is not None else "")
    network = eager.model.model if score is not None else eager.model  # the network itself, for the export
    runs: dict[str, Logits] = {"eager": lambda b: eager(torch.from_numpy(b)).numpy()}
    parity: dict[str, Any] = {}
    problems: dict[str, str] = {}
    onnx_path = export_onnx(network.float(), card, stage / GRAPH_FILES["onnxruntime"], dynamic_batch=True)
    runs["onnxruntime"] = onnx_runner(onnx_path)
    graphs = {"onnxruntime": onnx_path}
    try:
        from .openvino_export import onnx_to_openvino  # OpenVINO is optional: ORT alone then

        graphs["openvino"] = onnx_to_openvino(onnx_path, stage / GRAPH_FILES["openvino"])
        runs["openvino"] = openvino_runner(graphs["openvino"])
    except Exception as exc:
        problems["openvino"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    verified = []
    for name in [n for n in runs if n != "eager"]:
        # the logits, and the unknown decisions the graph's own score makes (predict and serve use them)
        parity[name] = {**compare_logits(reference, runs[name](batch.numpy()), card),
                        **unknown_parity(network, card, graphs[name], batch)}
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


def load_classifier(path: str | os.PathLike, precision: str = "auto", tta: bool | str | None = None,
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
