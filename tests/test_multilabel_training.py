"""Multi-label training whose tests belong in test_strategies.py (every strategy) and
test_resume.py (SIGTERM then --resume); they wait here until those files can take them."""

from __future__ import annotations

import csv

import pytest
from conftest import CLASSES, FAST, train_cmd

import visiontune
from visiontune.inference.classifier import Classifier
from visiontune.training.registry import PROBE_HEADS, STRATEGIES

# Only [linear-probe-logistic] is fast: the one-vs-rest scikit-learn fit is multi-label specific.
# The others are slow: each strategy and head is covered single-label by test_strategies, and the
# multi-label loss and metrics through the warm-up and Lightning by ml_run (test_predict's
# test_run_tunes_thresholds_and_predicts_label_sets); "auto" and "svm" take the same one-vs-rest path.
ML_STRATEGY_CASES = [pytest.param(s, h, marks=[] if (s, h) == ("linear-probe", "logistic") else pytest.mark.slow)
                     for s, h in [(s, "linear") for s in STRATEGIES if s != "finetune"]
                     + [("linear-probe", h) for h in PROBE_HEADS if h != "linear"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,head", ML_STRATEGY_CASES)
def test_every_strategy_trains_multi_label(ml_data, tmp_path, strategy, head):
    run = visiontune.train(ml_data, strategy=strategy, head=head, epochs=2, freeze_epochs=1,
                           run_dir=str(tmp_path / "run"), **FAST)
    clf = Classifier.load(run.run_dir)
    assert clf.task.name == "multi" and len(clf.thresholds) == len(CLASSES)
    assert 0.0 <= run.metrics["val"]["macro_map"] <= 1.0
    assert set(clf.predict([next((ml_data.parent / "img").glob("*.png"))])[0]["scores"]) == set(CLASSES)


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
    proc = subprocess.Popen(train_cmd(ml_data, "--epochs", 3, "--freeze-epochs", 0, "--run-dir", run_dir),
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
