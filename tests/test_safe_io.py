"""No output is ever written through a symbolic link planted in a folder visiontune did not make:
each test builds the attack (a link named like an output, pointing at a victim file outside)
and asserts the victim is untouched and the user gets a clear error."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from visiontune.core.errors import ArtifactError, VisiontuneError
from visiontune.core.safe_io import atomic_write_text, open_append, save_figure
from visiontune.training.checkpoint_io import TEMP_MARK, atomic_write

VICTIM_TEXT = "#!/bin/sh\necho precious\n"


@pytest.fixture()
def victim(tmp_path) -> Path:
    path = tmp_path / "outside" / "victim.sh"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


def plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return link


def test_atomic_writes_refuse_a_linked_file_or_folder(tmp_path, victim):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(ArtifactError, match="symbolic link"):
        atomic_write_text(plant(folder / "out.txt", victim), "overwritten")
    plant(tmp_path / "linked", victim.parent)
    with pytest.raises(ArtifactError, match="symbolic link"):
        atomic_write_text(tmp_path / "linked" / "victim.sh", "overwritten")
    with pytest.raises(ArtifactError, match="symbolic link"):
        open_append(folder / "out.txt")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    with pytest.raises(ArtifactError):
        save_figure(fig, folder / "out.txt")
    plt.close(fig)
    assert victim.read_text() == VICTIM_TEXT
    assert sorted(p.name for p in folder.iterdir()) == ["out.txt"]  # no temp file left behind
    atomic_write_text(folder / "fine.txt", "ok")  # a plain file is written as before
    assert (folder / "fine.txt").read_text() == "ok"


def test_checkpoint_temp_file_planted_as_a_link_is_never_followed(tmp_path, victim):
    target = tmp_path / "checkpoints" / "epoch001.ckpt"
    plant(target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}"), victim)
    atomic_write(target, b"checkpoint bytes")
    assert target.read_bytes() == b"checkpoint bytes" and victim.read_text() == VICTIM_TEXT


def copy_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "someone's run"
    shutil.copytree(trained_run[0].run_dir, run, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    return run


def test_evaluate_refuses_outputs_linked_out_of_a_shipped_model(trained_run, tmp_path, victim):
    import visiontune

    run = copy_run(trained_run, tmp_path)
    for name in ("misclassified.csv", "confusion_matrix.png"):
        plant(run / "model" / name, victim)
    with pytest.raises(ArtifactError, match="symbolic link"):
        visiontune.evaluate(run, trained_run[1])
    assert victim.read_text() == VICTIM_TEXT
    result = visiontune.evaluate(run, trained_run[1], save=False)  # --no-save still scores it
    assert result["num_samples"] > 0 and victim.read_text() == VICTIM_TEXT
    mine = tmp_path / "my outputs"  # --out: the outputs go where the user says
    visiontune.evaluate(run, trained_run[1], out=mine)
    assert (mine / "misclassified.csv").is_file() and (mine / "confusion_matrix.png").is_file()
    assert victim.read_text() == VICTIM_TEXT


def test_recorded_training_data_is_used_only_for_the_users_own_run(trained_run, tmp_path):
    """A shipped model.json naming some folder as its training data does not make export walk it."""
    from visiontune.export.samples import resolve_data_path
    from visiontune.models.artifact import read_card

    own = resolve_data_path(read_card(trained_run[0].model_dir))
    assert own is not None and own.resolve() == Path(trained_run[1]).resolve()
    run = copy_run(trained_run, tmp_path)  # the same files, in a folder training never wrote
    assert read_card(run / "model").training["data"] == str(trained_run[1])
    assert resolve_data_path(read_card(run / "model")) is None


def test_cli_evaluate_says_so_without_a_traceback(trained_run, tmp_path, victim, capsys):
    from conftest import vt_main

    run = copy_run(trained_run, tmp_path)
    plant(run / "model" / "misclassified.csv", victim)
    code, out, err = vt_main(capsys, "evaluate", run, trained_run[1])
    assert code != 0 and "symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == VICTIM_TEXT


def test_report_and_export_refuse_linked_outputs(trained_run, tmp_path, victim):
    from visiontune.evaluation.report import write_report
    from visiontune.export.exporter import export_model

    run = copy_run(trained_run, tmp_path)
    plant(run / "report.html", victim)
    with pytest.raises(VisiontuneError):
        write_report(run, gradcam=False)
    plant(run / "export" / "onnx" / "model.onnx", victim)
    with pytest.raises(VisiontuneError):
        export_model(run, "onnx")
    assert victim.read_text() == VICTIM_TEXT


def test_crafted_checkpoint_state_cannot_make_resume_delete_files(tmp_path, victim):
    from visiontune.training.checkpoint_io import FolderModelCheckpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    own = folder / "epoch001.ckpt"
    own.write_bytes(b"x")
    outside = str(folder / ".." / ".." / "outside" / "victim.sh")
    plant(folder / "linked.ckpt", victim)
    callback = FolderModelCheckpoint(dirpath=folder, monitor="step", mode="max", save_top_k=2)
    callback.load_state_dict({"dirpath": str(folder), "best_model_score": 3.0, "best_model_path": outside,
                              "best_k_models": {outside: 3.0, str(folder / "linked.ckpt"): 2.5, str(own): 2.0},
                              "kth_best_model_path": outside, "kth_value": 3.0, "last_model_path": outside})
    assert list(callback.best_k_models) == [str(own)]
    assert callback.kth_best_model_path == str(own) and callback.best_model_path == ""
    assert callback.last_model_path == ""
    assert all(Path(p).resolve().parent == folder.resolve() for p in callback.best_k_models)
    assert victim.read_text() == VICTIM_TEXT


def test_no_interrupt_checkpoint_before_the_restore_completed(tmp_path):
    from visiontune.training.lightning_fit import InterruptCheckpoint

    saved = []

    class Trainer:
        def save_checkpoint(self, path):
            saved.append(path)

    callback = InterruptCheckpoint(tmp_path / "interrupted.ckpt")
    callback.on_exception(Trainer(), None, RuntimeError("restore failed"))
    assert saved == []  # a crash while restoring keeps the progress the checkpoints hold
    callback.on_train_start(Trainer(), None)
    callback.on_exception(Trainer(), None, KeyboardInterrupt())
    assert saved == [tmp_path / "interrupted.ckpt"]


def test_a_full_disk_keeps_the_previous_file_and_says_so_once(tmp_path, monkeypatch):
    import errno

    from visiontune.training.lightning_fit import InterruptCheckpoint

    text_file, ckpt = tmp_path / "metrics.json", tmp_path / "epoch001.ckpt"
    atomic_write_text(text_file, "previous")
    atomic_write(ckpt, b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for write in (lambda: atomic_write_text(text_file, "new"), lambda: atomic_write(ckpt, b"new")):
        with pytest.raises(ArtifactError, match="No space left") as info:
            write()
        assert info.value.kind == "no_space"
    assert text_file.read_text() == "previous" and ckpt.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch001.ckpt", "metrics.json"]  # no temp files

    class Trainer:
        def save_checkpoint(self, path):
            raise AssertionError("a second save on a full disk")

    callback = InterruptCheckpoint(tmp_path / "interrupted.ckpt")
    callback.on_train_start(Trainer(), None)
    callback.on_exception(Trainer(), None, info.value)  # nothing raised, nothing written


