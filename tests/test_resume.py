"""Crash safety and resume: kill -9 (across the frozen warm-up, and five times at random points,
some mid checkpoint write) and SIGTERM (of a fine-tune and of a linear probe), then --resume lands
on exactly the run an uninterrupted one gives; atomic checkpoint files; truncated checkpoints;
seeds and worker counts."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLASS_NAMES, CLASSES, FAST, FAST_FLAGS, make_folder, vt_main
from conftest import train_cmd as small_train_cmd

import visiontune
from visiontune.data.sampling import EpochSampler
from visiontune.inference.classifier import Classifier
from visiontune.training.checkpoint_io import (
    atomic_write,
    newest_valid_checkpoint,
    remove_stale_temp_files,
)

EPOCHS = 4
# deterministic settings: fp32, fixed seed; two loader workers on purpose (augmentation is seeded
# per sample, so worker processes restarting on resume must not change anything)
FLAGS = ["--epochs", str(EPOCHS), "--freeze-epochs", "0", "--img-size", "32", "--batch-size", "4",
         "--workers", "2", "--precision", "32", "--seed", "3", "--no-report", "--augment", "standard"]
TIMING = ("epoch_seconds", "train_images_per_second")


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "visiontune.cli", "train", *map(str, args)]


def slow_train_cmd(seconds: float, *args) -> list[str]:
    """:func:`train_cmd` in a process whose checkpoint renames wait ``seconds`` (tests/slow_checkpoints.py)."""
    return [sys.executable, str(Path(__file__).with_name("slow_checkpoints.py")), str(seconds), "train",
            *map(str, args)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = run_dir / "checkpoints" / f"epoch{EPOCHS - 1:03d}.ckpt"  # Lightning counts epochs from 0
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def metric_columns(run_dir: Path) -> list[tuple[str, ...]]:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [(r["epoch"], r["train_loss"], r["train_accuracy"], r["val_loss"], r["val_accuracy"]) for r in rows]


def metric_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh) if r.get("epoch")]


def all_checkpoints_readable(folder: Path) -> None:
    for path in folder.glob("*.ckpt"):
        torch.load(path, map_location="cpu", weights_only=True)  # raises on a torn file


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def mid_epoch(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved after some, not all, of its epoch's batches (Lightning's own count)."""
    progress = torch.load(checkpoint, map_location="cpu", weights_only=True)["loops"]["fit_loop"][
        "epoch_loop.batch_progress"]
    return progress["current"]["processed"] > 0 and not progress["is_last_batch"]


def step_checkpoints_after_an_epochs_last_batch(run_dir: Path) -> list[str]:
    """Step checkpoints saved at a step an epoch ended on (its own checkpoint follows the validation)."""
    ckpts = run_dir / "checkpoints"
    ends = {torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in ckpts.glob("epoch*.ckpt")}
    return [p.name for p in ckpts.glob("step*.ckpt") if int(p.stem[4:]) in ends]


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(open(run_dir / "metrics.csv"))]


def test_resume_after_kill_9_across_the_frozen_warmup(tmp_path, capsys):
    """Default finetune (epoch 1 = frozen warm-up on cached features, then Lightning epochs):
    kill -9 after the first Lightning epoch, resume, and every epoch appears exactly once."""
    data = make_folder(tmp_path / "my data", per_class=8)
    run_dir = tmp_path / "run dir"
    epochs = 4
    proc = subprocess.Popen(train_cmd(data, "--epochs", epochs, "--run-dir", run_dir, *FAST_FLAGS),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 200
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(metric_epochs(run_dir)) >= 2 and list((run_dir / "checkpoints").glob("*.ckpt")):
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = metric_epochs(run_dir)
    assert 2 <= len(done) < epochs and done == list(range(1, len(done) + 1))

    code, out, err = vt_main(capsys, "train", "--resume", run_dir)
    assert code == 0 and out.strip().splitlines()[-1] == f"run: {run_dir}"
    assert "Traceback" not in err
    assert metric_epochs(run_dir) == list(range(1, epochs + 1))
    clf = visiontune.load(run_dir)
    assert clf.class_names == CLASS_NAMES
    assert 1 <= clf.card.metrics["epoch"] <= epochs
    # bit-exact: the same numbers as a run that was never interrupted
    reference = visiontune.train(data, epochs=epochs, run_dir=tmp_path / "reference", **FAST)
    assert metric_columns(run_dir) == metric_columns(reference.run_dir)


def test_same_seed_same_metrics_for_any_worker_count_other_seed_differs(image_folder, tmp_path):
    """Augmentation is seeded per sample, so loader processes do not change the run; the second run
    finds the warm-up's features in the cache the first one filled, and must not differ either."""
    opts = {**FAST, "epochs": 2, "freeze_epochs": 1, "precision": "32", "augment": "standard"}
    a = visiontune.train(image_folder, run_dir=str(tmp_path / "a"), **{**opts, "seed": 1, "workers": 0})
    b = visiontune.train(image_folder, run_dir=str(tmp_path / "b"), **{**opts, "seed": 1, "workers": 2})
    c = visiontune.train(image_folder, run_dir=str(tmp_path / "c"), **{**opts, "seed": 2, "workers": 0})
    assert _rows(a.run_dir) == _rows(b.run_dir)
    assert _rows(a.run_dir) != _rows(c.run_dir)


def test_resume_falls_back_when_newest_checkpoint_is_truncated(image_folder, tmp_path):
    run = visiontune.train(image_folder, run_dir=str(tmp_path / "r"), epochs=3, freeze_epochs=0, **FAST)
    ckpts = sorted((run.run_dir / "checkpoints").glob("epoch*.ckpt"))
    assert [p.name for p in ckpts] == ["epoch001.ckpt", "epoch002.ckpt"]  # the two newest are kept
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    assert newest_valid_checkpoint(run.run_dir / "checkpoints") == ckpts[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_checkpoint_and_resume_completes(image_folder, tmp_path, capsys):
    """SIGTERM in a fine-tuning epoch (a loader worker running): exit 130, interrupted.ckpt, --resume
    finishes. In `make test` the same loop's SIGTERM handling is covered by
    test_linear_probe_sigterm_mid_epoch_resumes_bit_exact and test_finetune_sigterm_in_its_warmup_resumes_bit_exact,
    and resuming the fine-tuning phase by test_resume_after_kill_9_across_the_frozen_warmup."""
    from visiontune.cli import main

    run_dir = tmp_path / "run"
    epochs = 3
    proc = subprocess.Popen(train_cmd(image_folder, "--epochs", epochs, "--freeze-epochs", "0", "--run-dir", run_dir,
                                      "--img-size", "32", "--batch-size", "4", "--workers", "1", "--no-report"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(metric_epochs(run_dir)) >= 1, proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]  # stopped by the signal, not finished
    assert "visiontune train --resume" in err and "Traceback" not in err
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert metric_epochs(run_dir) == list(range(1, epochs + 1))


def sigterm_while_writing(data, run_dir, epochs: int, options: dict, temp_pattern: str) -> str:
    """Train ``data`` in a subprocess, SIGTERM it while a checkpoint temp file matching
    ``temp_pattern`` exists, and return its stderr, after checking the signal stopped it (exit 130)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    # each checkpoint's rename waits 0.5 s: a window to signal the run in, not a synchronisation
    proc = subprocess.Popen(slow_train_cmd(0.5, data, "--epochs", epochs, "--run-dir", run_dir, *FAST_FLAGS, *flags,
                                           "--no-report"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hit = wait_for(lambda: any((run_dir / "checkpoints").glob(temp_pattern)), proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert hit and proc.returncode == 130, err[-2000:]  # stopped by the signal, not finished
    return err


def test_linear_probe_sigterm_mid_epoch_resumes_bit_exact(tmp_path, capsys):
    """--head linear trains in the same loop as fine-tuning: SIGTERM (while a step checkpoint is
    written, so mid-epoch) checkpoints and exits 130; --resume continues that epoch after the batches
    it had trained on and ends with the weights and metrics of a run that was never interrupted."""
    from safetensors.torch import load_file

    data = make_folder(tmp_path / "my data", per_class=8)
    epochs, options = 4, {"strategy": "linear-probe", "checkpoint_every_steps": 1, "precision": "32", "seed": 3}
    reference = visiontune.train(data, epochs=epochs, run_dir=tmp_path / "reference", **options, **FAST)
    run_dir, ckpts = tmp_path / "run dir", tmp_path / "run dir" / "checkpoints"
    err = sigterm_while_writing(data, run_dir, epochs, options, ".head-step*.ckpt.tmp-*")
    assert "visiontune train --resume" in err and "Traceback" not in err
    assert (ckpts / "head-interrupted.ckpt").is_file()
    done = metric_epochs(run_dir)
    assert len(done) < epochs and done == list(range(1, len(done) + 1))

    code, out, err = vt_main(capsys, "train", "--resume", run_dir)
    assert code == 0 and "Traceback" not in err, err
    assert metric_columns(run_dir) == metric_columns(reference.run_dir)
    last = f"head-epoch{epochs - 1:03d}.ckpt"
    weights, expected = (torch.load(r / "checkpoints" / last, map_location="cpu", weights_only=True)["state_dict"]
                         for r in (run_dir, reference.run_dir))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    saved, best = (load_file(r / "model" / "model.safetensors") for r in (run_dir, reference.run_dir))
    assert all(torch.equal(saved[k], best[k]) for k in best)


def test_finetune_sigterm_in_its_warmup_resumes_bit_exact(tmp_path, capsys):
    """The frozen warm-up is a fit of the same loop (the head on cached features): SIGTERM in it
    leaves the head's checkpoint; --resume finishes the warm-up from it, then fine-tunes, and every
    figure equals an uninterrupted run's."""
    from visiontune.training.checkpoint_io import checkpoint_phase

    data = make_folder(tmp_path / "my data", per_class=8)
    epochs, options = 3, {"freeze_epochs": 2, "precision": "32", "seed": 3}
    reference = visiontune.train(data, epochs=epochs, run_dir=tmp_path / "reference", **options, **FAST)
    run_dir, ckpts = tmp_path / "run dir", tmp_path / "run dir" / "checkpoints"
    sigterm_while_writing(data, run_dir, epochs, options, ".head-epoch*.ckpt.tmp-*")
    assert checkpoint_phase(ckpts / "head-interrupted.ckpt") == "head" and not list(ckpts.glob("epoch*.ckpt"))

    code, _, err = vt_main(capsys, "train", "--resume", run_dir)
    assert code == 0 and "Traceback" not in err, err
    assert metric_columns(run_dir) == metric_columns(reference.run_dir)
    body = "epoch000.ckpt"  # the fine-tuning's one epoch after the two of the warm-up
    weights, expected = (torch.load(r / "checkpoints" / body, map_location="cpu", weights_only=True)["state_dict"]
                         for r in (run_dir, reference.run_dir))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def resume_matches(capsys, run_dir: Path, reference: Path, epochs: int) -> None:
    """``--resume run_dir`` completes, with the metrics rows, the last epoch's checkpointed weights and
    the saved model of the uninterrupted ``reference`` run, bit for bit."""
    from safetensors.torch import load_file

    code, _, err = vt_main(capsys, "train", "--resume", run_dir)
    assert code == 0 and "Traceback" not in err, err
    assert metric_columns(run_dir) == metric_columns(reference)
    last = f"epoch{epochs - 1:03d}.ckpt"
    weights, expected = (torch.load(r / "checkpoints" / last, map_location="cpu", weights_only=True)["state_dict"]
                         for r in (run_dir, reference))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    saved, best = (load_file(r / "model" / "model.safetensors") for r in (run_dir, reference))
    assert all(torch.equal(saved[k], best[k]) for k in best)


def test_finetune_sigterm_mid_epoch_resumes_bit_exact(tmp_path, capsys):
    """A fine-tune on images stopped by SIGTERM mid-epoch (while a step checkpoint is written, two
    loader workers running) resumes after the batches it had trained on: the same weights and the
    same metrics rows (the epoch's training loss and accuracy included) as a run never interrupted.
    Before the image loader's position was checkpointed, the resumed epoch replayed its first batches."""

    data = make_folder(tmp_path / "my data", per_class=8)
    epochs = 2
    options = {"freeze_epochs": 0, "checkpoint_every_steps": 1, "precision": "32", "seed": 3, "workers": 2,
               "augment": "standard"}
    reference = visiontune.train(data, epochs=epochs, run_dir=tmp_path / "reference", **{**FAST, **options})
    run_dir, ckpts = tmp_path / "run dir", tmp_path / "run dir" / "checkpoints"
    sigterm_while_writing(data, run_dir, epochs, options, ".step*.ckpt.tmp-*")
    assert mid_epoch(ckpts / "interrupted.ckpt")

    resume_matches(capsys, run_dir, reference.run_dir, epochs)
    assert step_checkpoints_after_an_epochs_last_batch(reference.run_dir) == []
    assert sorted(p.name for p in (reference.run_dir / "checkpoints").glob("step*.ckpt"))  # it kept some


def test_progressive_sigterm_mid_epoch_resumes_bit_exact(tmp_path, capsys):
    """progressive's layer groups are set again when a fit starts: a run resumed mid-epoch (which
    Lightning gives no start of that epoch) trains the groups of that epoch, not the head alone,
    and ends with an uninterrupted run's weights."""
    data = make_folder(tmp_path / "my data", per_class=8)
    epochs = 2
    options = {"strategy": "progressive", "unfreeze_every": 1, "freeze_epochs": 0, "checkpoint_every_steps": 1,
               "precision": "32", "seed": 3}
    reference = visiontune.train(data, epochs=epochs, run_dir=tmp_path / "reference", **{**FAST, **options})
    run_dir, ckpts = tmp_path / "run dir", tmp_path / "run dir" / "checkpoints"
    sigterm_while_writing(data, run_dir, epochs, options, ".step*.ckpt.tmp-*")
    assert mid_epoch(ckpts / "interrupted.ckpt")
    resume_matches(capsys, run_dir, reference.run_dir, epochs)


def test_freeze_bottom_holds_through_a_mid_epoch_resume(tmp_path, capsys):
    """--freeze-bottom's flags are set before the trainer starts, not at an epoch start, which a run
    resumed mid-epoch does not get: after SIGTERM in the one fine-tuning epoch and --resume, the
    bottom groups are still the pretrained ones and the groups above trained on from the checkpoint."""
    from safetensors.torch import load_file

    from visiontune.models.factory import build_model

    data = make_folder(tmp_path / "my data", per_class=8)
    options = {"freeze_bottom": 2, "freeze_epochs": 0, "checkpoint_every_steps": 1, "precision": "32", "seed": 3}
    run_dir, ckpts = tmp_path / "run dir", tmp_path / "run dir" / "checkpoints"
    sigterm_while_writing(data, run_dir, 1, options, ".step*.ckpt.tmp-*")
    stopped = torch.load(ckpts / "interrupted.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    code, _, err = vt_main(capsys, "train", "--resume", run_dir)
    assert code == 0 and "Traceback" not in err, err
    final = torch.load(ckpts / "epoch000.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    pretrained = build_model("efficientnet_lite0", num_classes=len(CLASSES))[0].state_dict()
    for name in ("conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight"):
        assert torch.equal(final["model." + name], pretrained[name]), name
    assert not torch.equal(final["model.blocks.6.0.conv_pw.weight"], stopped["model.blocks.6.0.conv_pw.weight"])
    assert load_file(run_dir / "model" / "model.safetensors").keys()


def test_any_checkpoint_of_the_fine_tuning_outranks_the_warmups(tmp_path):
    """The head's steps are counted apart from the body's: a warm-up of 10 passes per epoch can be
    at a higher step than the fine-tuning's first checkpoint, which is still further into the run."""
    import io

    from visiontune.training.checkpoint_io import PHASE_KEY, write_digest

    def save(name: str, step: int, epoch: int, phase: str | None) -> Path:
        buffer = io.BytesIO()
        torch.save({"global_step": step, "epoch": epoch, "state_dict": {"w": torch.ones(4)},
                    **({PHASE_KEY: phase} if phase else {})}, buffer)
        atomic_write(tmp_path / name, buffer.getvalue())
        write_digest(tmp_path / name, buffer.getvalue())
        return tmp_path / name

    for name, step, epoch, phase in [("head-epoch000.ckpt", 400, 1, "head"), ("head-epoch001.ckpt", 800, 2, "head"),
                                     ("epoch000.ckpt", 40, 1, "body"), ("step0000050.ckpt", 50, 1, None)]:
        newest = save(name, step, epoch, phase)  # each further into the run than the ones before
        assert newest_valid_checkpoint(tmp_path) == newest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_five_times_then_resume_matches_uninterrupted(image_folder, tmp_path):
    reference = tmp_path / "reference run"
    subprocess.run(train_cmd(image_folder, "--run-dir", reference, *FLAGS), check=True, capture_output=True,
                   timeout=300)
    run_dir, ckpts = tmp_path / "killed run", tmp_path / "killed run" / "checkpoints"
    slow = 1.0  # each checkpoint's rename waits 1 s: room to kill while its temp file exists
    rng = random.Random(7)
    kills = {"mid-write": 0, "random": 0}
    for trial in range(5):
        resume = any(ckpts.glob("*.ckpt"))
        args = ["--resume", run_dir] if resume else [image_folder, "--run-dir", run_dir, *FLAGS]
        if not resume and run_dir.exists():  # killed before its first checkpoint: start over
            shutil.rmtree(run_dir)
        started = time.time()
        proc = subprocess.Popen(slow_train_cmd(slow, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

        def saved_since_start(n: int, started: float = started) -> bool:
            return sum(p.stat().st_mtime > started for p in ckpts.glob("epoch*.ckpt")) >= n

        if trial % 2 == 0:  # during the 1st or 2nd checkpoint write of this process, at a random moment of it
            nth = rng.choice([1, 2])
            wait_for(lambda nth=nth: saved_since_start(nth - 1), proc)
            hit = wait_for(lambda: any(ckpts.glob(".*.ckpt.tmp-*")), proc)
            time.sleep(rng.uniform(0.05, 0.8))
            kills["mid-write"] += hit and proc.poll() is None
        else:  # anywhere after one more epoch was saved: training, validation, the next write
            wait_for(lambda: saved_since_start(1), proc)
            time.sleep(rng.uniform(0.0, 3.0))
            kills["random"] += proc.poll() is None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        all_checkpoints_readable(ckpts)  # a kill never leaves a torn *.ckpt
    assert kills["mid-write"] >= 2, kills  # the slowed writes really were interrupted
    done = subprocess.run(train_cmd("--resume", run_dir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(ckpts.glob(".*.tmp-*")), "stale temp files are cleaned up on resume"
    weights, expected = final_weights(run_dir), final_weights(reference)
    assert weights.keys() == expected.keys()
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name
    assert metric_columns(run_dir) == metric_columns(reference)


def test_a_loader_position_read_from_a_checkpoint_is_validated(capsys):
    """A checkpoint is not trusted: a loader position that is not whole numbers within the epoch is
    refused with a warning (the epoch runs from its first batch); a valid one skips exactly the
    batches trained on, in the checkpoint's epoch (even before Lightning's counter has moved on)."""
    from torch.utils.data import Dataset

    from visiontune.training.lightning_fit import ResumableLoader

    class Keys(Dataset):  # an image set's stand-in: each (index, epoch) key gives its index
        def __len__(self) -> int:
            return 10

        def __getitem__(self, key: tuple[int, int]) -> int:
            return key[0]

    def first_items(state) -> list[int]:
        it = ResumableLoader(Keys(), lambda: None, batch_size=4, sampler=EpochSampler(10, seed=1, epoch_fn=lambda: 0))
        it.load_state_dict(state)
        return [int(i) for batch in it for i in batch]

    def order(epoch: int) -> list[int]:
        s = EpochSampler(10, seed=1)
        s.set_epoch(epoch)
        return s.order()

    for bad in ({"epoch": 0, "batches": -1}, {"epoch": 0, "batches": 3}, {"epoch": -1, "batches": 0},
                {"epoch": 0, "batches": 1.5}, {"epoch": "0", "batches": 1}, {"epoch": True, "batches": 1}, [0, 1]):
        assert first_items(bad) == order(0), bad
        assert "position in its epoch is not valid" in capsys.readouterr().err
    assert first_items({"epoch": 0, "batches": 1}) == order(0)[4:]
    assert first_items({"epoch": 2, "batches": 2}) == order(2)[8:]  # the checkpoint's epoch, not the counter's
    assert "not valid" not in capsys.readouterr().err


def test_atomic_write_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "epoch001.ckpt"
    atomic_write(target, b"old" * 1000)
    atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert list(tmp_path.iterdir()) == [target]
    (tmp_path / f".epoch002.ckpt.tmp-{os.getpid()}").write_bytes(b"torn")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [f".epoch002.ckpt.tmp-{os.getpid()}"]
    assert list(tmp_path.iterdir()) == [target]


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(i for i, _ in a) == list(range(10))
    b.set_epoch(4)
    assert [i for i, _ in a] != [i for i, _ in b]
    ranks = [EpochSampler(7, seed=1, rank=r, world=2) for r in range(2)]
    seen = [i for s in ranks for i, _ in s]
    assert set(seen) == set(range(7)) and len(seen) == 8  # padded to equal shards
    weighted = EpochSampler(6, seed=0, weights=torch.tensor([0.0, 0, 0, 0, 0, 1]))
    assert {i for i, _ in weighted} == {5}


# slow: covered fast by test_resume::test_sigterm_saves_checkpoint_and_resume_completes (the SIGTERM and
# resume path), test_split_csv_round_trips_label_sets (the resumed run re-reads the label-set split CSVs)
# and ml_run (thresholds tuned at the end of a run)
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_then_resume_completes_a_multi_label_run(ml_data, tmp_path):
    import signal
    import subprocess
    import time

    from visiontune.cli import main

    run_dir = tmp_path / "ml run"
    proc = subprocess.Popen(small_train_cmd(ml_data, "--epochs", 3, "--freeze-epochs", 0, "--run-dir", run_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((run_dir / "checkpoints").glob("epoch*.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "visiontune train --resume" in err, err[-2000:]
    assert main(["train", "--resume", str(run_dir)]) == 0
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))]
    assert epochs == [1, 2, 3]
    clf = Classifier.load(run_dir)
    assert clf.task.name == "multi" and len(clf.thresholds) == len(CLASSES)
