"""Checkpoint files (training/checkpoint_io.py): which checkpoint a resume takes, and skipping
damaged ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visiontune.training.checkpoint_io import atomic_write


def write_checkpoint(path: Path, step: int, epoch: int, digest: bool = True) -> Path:
    import io

    import torch

    from visiontune.training.checkpoint_io import write_digest

    buffer = io.BytesIO()
    torch.save({"global_step": step, "epoch": epoch, "state_dict": {"w": torch.ones(50_000)}}, buffer)
    atomic_write(path, buffer.getvalue())
    if digest:
        write_digest(path, buffer.getvalue())
    return path


def test_resume_takes_the_checkpoint_furthest_into_training_whatever_the_file_times(tmp_path):
    from visiontune.training.checkpoint_io import newest_valid_checkpoint

    later = write_checkpoint(tmp_path / "epoch002.ckpt", step=20, epoch=2)
    earlier = write_checkpoint(tmp_path / "epoch001.ckpt", step=10, epoch=1)
    os.utime(later, (1_000_000, 1_000_000))  # `cp -r` + `touch` made the earlier one look newer
    assert newest_valid_checkpoint(tmp_path) == later
    assert earlier.exists()


@pytest.mark.parametrize("digest", [True, False])
def test_resume_skips_a_checkpoint_with_overwritten_bytes(tmp_path, capsys, digest):
    from visiontune.training.checkpoint_io import newest_valid_checkpoint

    older = write_checkpoint(tmp_path / "epoch001.ckpt", step=10, epoch=1, digest=digest)
    newest = write_checkpoint(tmp_path / "epoch002.ckpt", step=20, epoch=2, digest=digest)
    data = bytearray(newest.read_bytes())
    data[len(data) // 3:len(data) // 3 + 100_000] = b"\xff" * 100_000  # still a valid zip: loads as NaN
    newest.write_bytes(bytes(data))
    assert newest_valid_checkpoint(tmp_path) == older
    assert "skipping" in capsys.readouterr().out
