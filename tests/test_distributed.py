"""DDP through Lightning: 2 CPU processes (gloo) on one machine."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import FAST, train_cmd

import visiontune
from visiontune.training.config import TrainConfig
from visiontune.training.lightning_fit import ImageDataModule
from visiontune.training.setup import setup_run


def test_shards_cover_every_sample_once(image_folder, tmp_path):
    ctx = setup_run(TrainConfig.from_dict({"data": str(image_folder), "val_fraction": 0.25,
                                           "run_dir": str(tmp_path / "r"), **FAST}))
    data = ImageDataModule(ctx)
    seen_train, seen_val = [], []
    for rank in range(2):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        seen_train += [index for index, epoch in data.train_dataloader().sampler]
        seen_val += list(data.val_dataloader().sampler)
    # every sample each epoch; the sampler pads an odd count with one repeat so ranks stay in step
    assert set(seen_train) == set(range(len(data.train_set)))
    assert len(seen_train) - len(data.train_set) == len(data.train_set) % 2
    assert sorted(seen_val) == list(range(len(data.val_set)))


@pytest.mark.timeout(900)
def test_two_process_ddp_matches_single_process_evaluation(image_folder, tmp_path):
    run_dir = tmp_path / "ddp run"
    cmd = [sys.executable, "-m", "visiontune.cli", "train", str(image_folder), "--devices", "2", "--epochs", "2",
           "--freeze-epochs", "0", "--val-fraction", "0.25", "--run-dir", str(run_dir), "--img-size", "32",
           "--batch-size", "4", "--workers", "0", "--no-report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # rank 0 writes, once per epoch
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    best = max(float(r["val_accuracy"]) for r in rows)
    # the synced DDP validation metric equals a single-process evaluation of the saved model
    assert meta["metrics"]["val"]["accuracy"] == pytest.approx(best, abs=1e-4)
    assert proc.stdout.count("run: ") == 1


# slow: covered fast by test_two_process_ddp_matches_single_process_evaluation (launch, sync, one run line,
# card = synced metric), test_shards_cover_every_sample_once and test_metrics_equal_sklearn_on_a_fixed_example
# (multi-label metrics); only the all-gather of MultilabelAveragePrecision's list state is then left to -m slow
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_ddp_trains_multi_label(ml_data, tmp_path):
    """Two gloo processes: the run completes once, and the card's val macro mAP is what a
    single-process evaluation of the saved model on the run's own val split gives."""
    import subprocess

    run_dir = tmp_path / "ddp run"
    proc = subprocess.run(train_cmd(ml_data, "--devices", 2, "--epochs", 2, "--freeze-epochs", 0, "--run-dir",
                                     run_dir), capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1
    card = json.loads((run_dir / "model" / "model.json").read_text())
    assert card["inference"]["task"] == "multi"
    result = visiontune.evaluate(run_dir, run_dir / "splits" / "val.csv", save=False)
    assert result["macro_map"] == pytest.approx(card["metrics"]["val"]["macro_map"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_planned_two_process_run_plans_once_and_trains(image_folder, tmp_path):
    """Without --epochs a run is planned: rank 0 measures and plans, the process Lightning's launcher
    starts reads that plan (with rank 0's clock) instead of planning its own, and both stop together."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "visiontune.cli", "train", str(image_folder), "--devices", "2",
                           "--time", "1m", "--run-dir", str(run_dir), "--img-size", "32", "--batch-size", "4",
                           "--no-report", "--no-progress"], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("measuring this machine") == 1 and "Traceback" not in proc.stderr
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["strategy"] == "finetune"  # several processes train on images
    assert (run_dir / "model" / "model.json").is_file()
