"""Crash-safe checkpoint files and the RNG state a bit-exact resume needs.

:class:`AtomicCheckpointIO` serialises in memory, writes a hidden temp file beside the target,
fsyncs it and renames it over the target: a kill at any moment leaves either the old file or
the new one, never a torn checkpoint under a ``*.ckpt`` name. Temp files left by a kill are
removed by :func:`remove_stale_temp_files` when the run resumes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..core.safe_io import raise_space_error, refuse_link

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
DIGEST_SUFFIX = ".sha256"
# Which trainer wrote a checkpoint: the head on cached features (a linear probe, or the frozen
# warm-up before fine-tuning) or the whole network. A run's fine-tuning comes after its warm-up,
# so any checkpoint of the body is further into the run than every checkpoint of the head, whose
# steps and epochs are counted separately. Checkpoints without the key are the body's.
PHASE_KEY = "visiontune_phase"
HEAD_PHASE, BODY_PHASE = "head", "body"
PHASE_ORDER = {HEAD_PHASE: 0, BODY_PHASE: 1}


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full: no temp file left, the previous checkpoint kept, one clear error
        tmp.unlink(missing_ok=True)
        raise_space_error(path, exc)
        raise
    _fsync_dir(path.parent)


def write_digest(path: Path, data: bytes) -> None:
    """``<checkpoint>.sha256`` beside a checkpoint: resume verifies every byte against it (a
    checkpoint's zip records carry no checksum torch.load checks: overwritten bytes load as NaN)."""
    atomic_write(path.with_name(path.name + DIGEST_SUFFIX), hashlib.sha256(data).hexdigest().encode())


def verified(path: Path) -> bool | None:
    """True when the checkpoint matches its digest, False when it does not, None without one."""
    digest = path.with_name(path.name + DIGEST_SUFFIX)
    if not digest.is_file() or digest.is_symlink():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return digest.read_text().strip() == h.hexdigest()


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written checkpoint temp files (left by a kill) in ``folder``."""
    stale = [p for p in Path(folder).glob(f".*.ckpt*{TEMP_MARK}*") if p.is_file()]
    stale += [p for p in Path(folder).glob(f"*.ckpt{DIGEST_SUFFIX}")  # digests of rotated-away checkpoints
              if not p.with_name(p.name[:-len(DIGEST_SUFFIX)]).exists()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def newest_valid_checkpoint(folder: Path) -> Path | None:
    """The checkpoint furthest into training (its phase, then its own stored step and epoch, not
    the file times, which a copy resets) among those that verify against their digest and load
    (weights only); corrupt or truncated ones are skipped, each said."""
    found: list[tuple[tuple[int, int, int, float], Path]] = []
    candidates = [p for p in folder.glob("*.ckpt") if p.is_file() and not p.is_symlink()] if folder.is_dir() else []
    for path in candidates:
        check = verified(path)
        if check is False:
            print(f"skipping checkpoint {path.name}: its bytes do not match {path.name}{DIGEST_SUFFIX}")
            continue
        try:  # with a verified digest the tensors can stay on disk; without one, read them all
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=bool(check))
            if not check and not all(torch.isfinite(t).all() for t in _tensors(state.get("state_dict", {}))):
                raise ValueError("non-finite weights")
            phase = PHASE_ORDER.get(state.get(PHASE_KEY), PHASE_ORDER[BODY_PHASE])
            progress = (phase, int(state.get("global_step", 0)), int(state.get("epoch", 0)), path.stat().st_mtime)
        except Exception as exc:  # truncated or corrupt: fall back to the previous one
            print(f"skipping unreadable checkpoint {path.name}: {type(exc).__name__}")
            continue
        found.append((progress, path))
    return max(found, key=lambda item: item[0])[1] if found else None


def checkpoint_phase(path: str | os.PathLike) -> str:
    """:data:`HEAD_PHASE` or :data:`BODY_PHASE`: which trainer wrote the checkpoint at ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return HEAD_PHASE if state.get(PHASE_KEY) == HEAD_PHASE else BODY_PHASE


def _tensors(state: Any) -> list[torch.Tensor]:
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()] if isinstance(
        state, dict) else []


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a torn ``*.ckpt`` (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())
        write_digest(Path(path), buffer.getvalue())

    def remove_checkpoint(self, path) -> None:
        """Remove a rotated-away checkpoint and its digest."""
        super().remove_checkpoint(path)
        Path(path).with_name(Path(path).name + DIGEST_SUFFIX).unlink(missing_ok=True)


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


class FolderModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that restores, from a checkpoint, only the paths of files
    directly inside its own folder.

    The callback's saved state lists earlier checkpoints, which it deletes when it rotates them; a
    crafted checkpoint listing ``checkpoints/../../victim`` made ``--resume`` delete that file.
    Paths that resolve elsewhere, or that are not ``.ckpt`` files, are dropped and logged.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # no step checkpoint at an epoch's last batch: its own checkpoint follows the validation, which
        # Lightning would skip when resuming from a checkpoint of that batch (no metrics row, no best)
        if self._every_n_train_steps and batch_idx + 1 >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        folder = Path(self.dirpath).resolve() if self.dirpath else None

        def inside(path: Any) -> bool:
            if not isinstance(path, str) or not path or folder is None:
                return False
            candidate = Path(path)
            return (candidate.suffix == ".ckpt" and not candidate.is_symlink()
                    and candidate.resolve().parent == folder)

        clean = dict(state_dict)
        best = state_dict.get("best_k_models") or {}
        clean["best_k_models"] = {k: v for k, v in best.items() if inside(k)} if isinstance(best, dict) else {}
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in clean and not inside(clean[key]):
                clean[key] = ""
        dropped = (len(best) - len(clean["best_k_models"]) if isinstance(best, dict) else 1) + sum(
            1 for k in ("best_model_path", "kth_best_model_path", "last_model_path")
            if state_dict.get(k) and not clean.get(k))
        if dropped:
            log.warning("checkpoint state: ignored %d path(s) outside %s", dropped, self.dirpath)
        if clean["kth_best_model_path"] == "" and clean["best_k_models"]:  # keep the rotation consistent
            worst = min(clean["best_k_models"], key=lambda k: float(clean["best_k_models"][k]))
            clean["kth_best_model_path"], clean["kth_value"] = worst, clean["best_k_models"][worst]
        super().load_state_dict(clean)
