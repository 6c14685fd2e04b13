"""The fastest verified runtime of a PyTorch model on this CPU, as recorded in the user cache.

``visiontune predict``, ``evaluate`` and ``serve`` (``--backend auto``, the default) run a model
folder through ONNX Runtime or OpenVINO when that was measured faster here than eager PyTorch
and its output matched eager's. :func:`visiontune.export.runtime.prepare_runtime` builds and
measures the candidates once per model and machine; this module only reads its record::

    CACHE/runtimes/<key>/choice.json   {"backend": "openvino", "verified": [...], "images_per_s_b32": ..., ...}
    CACHE/runtimes/<key>/model.onnx    the ONNX graph (dynamic batch)
    CACHE/runtimes/<key>/model.xml/.bin  its OpenVINO conversion

``key`` hashes the weights, ``model.json``, visiontune's and the runtimes' versions and the CPU's
SIMD flags, so new weights, a new runtime or another CPU kind measure again. The cache lives in
the user's cache folder (``$VISIONTUNE_CACHE`` or ``~/.cache/visiontune``), never in the model
folder, which may be read-only or not the user's. A record that is missing, unreadable or names
a file that is not there means eager PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..core.hardware import cpu_info, device
from ..core.version import __version__
from ..data.cache import default_cache_dir
from ..models.artifact import META_FILE, WEIGHTS_FILE
from ..models.card import ModelCard
from .runners import OnnxRunner, OpenVinoRunner

CHOICE_FILE = "choice.json"
BACKENDS = ("auto", "eager", "onnxruntime", "openvino")  # --backend
GRAPH_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml"}
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "neon", "asimd")


def _versions() -> str:
    found = []
    for package in ("onnxruntime", "openvino", "torch"):
        try:
            found.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            found.append(f"{package}=none")
    return ",".join(found)


def accelerates(precision: str) -> bool:
    """Whether a graph runtime may replace eager PyTorch: on a CPU, at fp32 (``32``) or ``auto``
    (an explicit reduced precision, or a GPU, runs eager)."""
    return device() == "cpu" and precision in ("auto", "32")


def cpu_kind() -> str:
    """The CPU's model name and SIMD flags: what decides which runtime is fastest."""
    info = cpu_info()
    if info is None:
        import platform

        return platform.processor() or platform.machine()
    name, flags = info
    return f"{name} [{' '.join(f for f in SIMD_FLAGS if f in flags)}] x{os.cpu_count()}"


def runtime_dir(model_dir: str | os.PathLike, precision: str = "auto") -> Path:
    """Where the runtimes of the model in ``model_dir`` are cached on this machine."""
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, META_FILE):
        with open(Path(model_dir) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    digest.update(f"{__version__}|{_versions()}|{cpu_kind()}|{precision}".encode())
    return default_cache_dir() / "runtimes" / digest.hexdigest()[:32]


def read_choice(folder: Path) -> dict[str, Any] | None:
    """The record in ``folder``, checked: a known backend whose graph file exists, else None."""
    try:  # our own cache, but a shared $VISIONTUNE_CACHE could hold another user's graphs: only ours
        if folder.is_symlink() or (hasattr(os, "getuid") and folder.is_dir() and folder.stat().st_uid != os.getuid()):
            return None
        path = folder / CHOICE_FILE
        choice = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 65536 else None
    except (OSError, ValueError):
        return None
    if not isinstance(choice, dict) or choice.get("backend") not in ("eager", *GRAPH_FILES):
        return None
    if choice["backend"] != "eager" and not (folder / GRAPH_FILES[choice["backend"]]).is_file():
        return None
    return choice


def cached_runner(model_dir: str | os.PathLike, card: ModelCard, backend: str = "auto", precision: str = "auto"):
    """The runner of the recorded choice (``auto``) or of the named runtime when it was verified;
    None means eager PyTorch (nothing recorded, eager was fastest, or the runtime failed parity)."""
    folder = runtime_dir(model_dir, precision)
    choice = read_choice(folder)
    if choice is None:
        return None
    name = choice["backend"] if backend == "auto" else backend
    if name == "eager" or name not in choice.get("verified", []) or not (folder / GRAPH_FILES[name]).is_file():
        return None
    runner_type = OnnxRunner if name == "onnxruntime" else OpenVinoRunner
    try:
        runner, _ = runner_type.load(folder / GRAPH_FILES[name])
    except Exception:  # a damaged cache entry (or a runtime gone missing) means eager, not a failed command
        return None
    runner.pre = card.preprocessing
    return runner
