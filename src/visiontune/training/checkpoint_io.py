"""Crash-safe checkpoint files and the RNG state a bit-exact resume needs.

:class:`AtomicCheckpointIO` serialises in memory, writes a hidden temp file beside the target,
fsyncs it and renames it over the target: a kill at any moment leaves either the old file or
the new one, never a torn checkpoint under a ``*.ckpt`` name. Temp files left by a kill are
removed by :func:`remove_stale_temp_files` when the run resumes.
"""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..core.safe_io import refuse_link

# test hook: seconds to spread each checkpoint write over (so a test can kill -9 mid-write)
SLOW_WRITE_ENV = "VISIONTUNE_TEST_SLOW_CHECKPOINT_S"
TEMP_MARK = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link): removed, never written through
    slow = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
    chunks = 10 if slow > 0 else 1
    step = max(1, -(-len(data) // chunks))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start:start + step])
            if slow > 0:
                fh.flush()
                time.sleep(slow / chunks)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written checkpoint temp files (left by a kill) in ``folder``."""
    stale = [p for p in Path(folder).glob(f".*.ckpt{TEMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def newest_valid_checkpoint(folder: Path) -> Path | None:
    """The most recent checkpoint that loads (weights only); a truncated newest one is skipped."""
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in candidates:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except Exception as exc:  # truncated or corrupt: fall back to the previous one
            print(f"skipping unreadable checkpoint {path.name}: {type(exc).__name__}")
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a torn ``*.ckpt`` (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())


def rng_state() -> dict[str, Any]:
    """Every RNG training draws from in this process (dropout, drop-path, mixup ...)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain ints/floats/tensors only: checkpoints are loaded with weights_only=True
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
