"""The fastest verified runtime of a PyTorch model on this CPU, as recorded in the user cache.

``visiontune predict``, ``evaluate`` and ``serve`` (``--backend auto``, the default) run a model
folder through ONNX Runtime or OpenVINO when that was measured faster here than eager PyTorch
and its output matched eager's. :func:`visiontune.export.runtime.prepare_runtime` builds and
measures the candidates once per model and machine; this module only reads its record::

    CACHE/runtimes/<key>/choice.json   {"backend": "openvino", "verified": [...], "images_per_s_b32": ..., ...}
    CACHE/runtimes/<key>/model.onnx    the ONNX graph (dynamic batch)
    CACHE/runtimes/<key>/model.xml/.bin  its OpenVINO conversion

``key`` hashes the weights, ``model.json``, visiontune's and the runtimes' versions and the CPU's
SIMD flags, so new weights, a new runtime or another CPU kind measure again; the full key is
stored in the record and checked, so an entry renamed to another model's key is not used. The
cache lives in the user's cache folder (``$VISIONTUNE_CACHE`` or ``~/.cache/visiontune``), never in
the model folder, which may be read-only or not the user's. Its root must be this user's own,
private folder (checked at every use, through one descriptor: :func:`open_root`), entries are
opened without following links, and graphs are read by
:mod:`~visiontune.inference.graph_files`. A record that is missing, unreadable, written for
another key or names a file that is not there means eager PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, ExportError
from ..core.hardware import cpu_info, device
from ..core.registry import BACKENDS as CPU_BACKENDS
from ..core.version import __version__
from ..data.cache import default_cache_dir
from ..models.artifact import META_FILE, WEIGHTS_FILE
from ..models.card import ModelCard
from ..models.unknown import UNKNOWN_FILE
from .graph_files import entry_mode, read_in
from .runners import OnnxRunner, OpenVinoRunner

CHOICE_FILE = "choice.json"
BACKENDS = CPU_BACKENDS.names()  # --backend
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


class CacheUnavailable(ArtifactError):
    """The runtime cache cannot be trusted or used right now; the command runs eager PyTorch."""

    kind = "cache"


ROOT_NAME = "runtimes"
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def runtimes_root() -> Path:
    """The folder of the runtime cache: ``$VISIONTUNE_CACHE/runtimes`` (``~/.cache/visiontune/runtimes``)."""
    return default_cache_dir() / ROOT_NAME


@contextlib.contextmanager
def open_root(create: bool = False) -> Iterator[int]:
    """A descriptor of the cache root, checked at every use: a real folder (not a link), owned by
    this user and private to them (a folder of ours with a wider mode is narrowed to 0700).

    Everything in the cache is then opened relative to this descriptor, so a folder swapped in
    after the check is never read. Raises :class:`CacheUnavailable` (and ``OSError`` when it
    cannot be created), naming the remedy.
    """
    root = runtimes_root()
    if create:
        root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o700)
    try:
        fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        raise CacheUnavailable(f"no runtime cache at {root}") from None
    except OSError as exc:
        raise CacheUnavailable(f"the runtime cache {root} is not a folder of this user's ({exc.strerror}); set "
                               "VISIONTUNE_CACHE to a folder only you can write") from None
    try:
        info = os.fstat(fd)
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise CacheUnavailable(f"the runtime cache {root} belongs to another user (uid {info.st_uid}); its graphs "
                                   "could be anyone's. Set VISIONTUNE_CACHE to a folder only you can write")
        if info.st_mode & 0o077:  # ours, but others could plant entries: narrow it (older releases made it 0755)
            os.fchmod(fd, 0o700)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_entry(root_fd: int, name: str) -> Iterator[int | None]:
    """A descriptor of the entry ``name`` in the cache root (None when there is none, or when it is a
    link or not this user's folder: such an entry is not ours)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        yield None
        return
    try:
        ours = not hasattr(os, "getuid") or os.fstat(fd).st_uid == os.getuid()
        yield fd if ours else None
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=16)
def _files_digest(identity: tuple) -> str:
    """sha256 of the weights and ``model.json`` named in ``identity`` (their paths and stat), computed
    once per process for the same files: ``prepare_runtime`` and the loader both need the key."""
    digest = hashlib.sha256()
    for path, *_ in identity:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def runtime_key(model_dir: str | os.PathLike, precision: str = "auto") -> str:
    """The full key of a model's cache entry: its weights, ``model.json``, its unknown-score's
    statistics (when it has them), visiontune's and the runtimes' versions, the CPU kind and the
    precision (sha256, hex)."""
    identity = []
    scored = (Path(model_dir) / UNKNOWN_FILE).is_file()
    for name in (WEIGHTS_FILE, META_FILE, *((UNKNOWN_FILE,) if scored else ())):
        path = os.path.realpath(Path(model_dir) / name)
        info = os.stat(path)
        identity.append((path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
    digest = hashlib.sha256(_files_digest(tuple(identity)).encode())
    digest.update(f"{__version__}|{_versions()}|{cpu_kind()}|{precision}".encode())
    return digest.hexdigest()


def entry_name(key: str) -> str:
    """The cache entry's folder name for ``key``."""
    return key[:32]


def runtime_dir(model_dir: str | os.PathLike, precision: str = "auto") -> Path:
    """Where the runtimes of the model in ``model_dir`` are cached on this machine."""
    return runtimes_root() / entry_name(runtime_key(model_dir, precision))


def read_choice(entry_fd: int | None, key: str) -> dict[str, Any] | None:
    """The record in the entry, checked: written for ``key``, a known backend whose graph file is
    a regular file in the entry; else None."""
    if entry_fd is None:
        return None
    try:
        choice = json.loads(read_in(entry_fd, CHOICE_FILE, 65536))
    except (ExportError, ValueError):
        return None
    if not isinstance(choice, dict) or choice.get("key") != key or choice.get("backend") not in ("eager", *GRAPH_FILES):
        return None  # another model's entry renamed to this key, a damaged or an older record
    if choice["backend"] != "eager" and not _regular(entry_fd, GRAPH_FILES[choice["backend"]]):
        return None
    return choice


def _regular(dir_fd: int, name: str) -> bool:
    return stat.S_ISREG(entry_mode(dir_fd, name) or 0)


def cached_runner(model_dir: str | os.PathLike, card: ModelCard, backend: str = "auto", precision: str = "auto"):
    """The runner of the recorded choice (``auto``) or of the named runtime when it was verified;
    None means eager PyTorch (nothing recorded, eager was fastest, the runtime failed parity, or
    the cache is not this user's own)."""
    key = runtime_key(model_dir, precision)
    try:
        with open_root() as root_fd, open_entry(root_fd, entry_name(key)) as entry_fd:
            choice = read_choice(entry_fd, key)
            if choice is None:
                return None
            name = choice["backend"] if backend == "auto" else backend
            if name == "eager" or name not in choice.get("verified", []) or not _regular(entry_fd, GRAPH_FILES[name]):
                return None
            runner_type = OnnxRunner if name == "onnxruntime" else OpenVinoRunner
            path = runtimes_root() / entry_name(key) / GRAPH_FILES[name]
            runner, _ = runner_type.load(path, dir_fd=entry_fd)
    except Exception:  # an unusable or damaged cache (or a runtime gone missing) means eager, not a failed command
        return None
    runner.pre = card.preprocessing
    return runner
