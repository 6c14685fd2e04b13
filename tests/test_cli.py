"""One end-to-end test per subcommand through the real console entry point (subprocess)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_folder

BASE_FLAGS = ["--img-size", "32", "--batch-size", "8", "--workers", "0"]
FAST_FLAGS = BASE_FLAGS + ["--no-report"]


def vt(*args, check=True, timeout=280, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "visiontune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_train_cli_path_with_spaces(image_folder, tmp_path):
    run_dir = tmp_path / "out dir" / "run"
    proc = vt("train", image_folder, "--epochs", "1", "--run-dir", run_dir, *BASE_FLAGS)
    assert proc.stdout.strip().splitlines()[-1] == f"run: {run_dir}"
    assert (run_dir / "model" / "model.json").is_file()
    assert (run_dir / "report.html").is_file()  # written automatically at the end of train
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert meta["calibration"]["temperature"] > 0  # fitted on val, used by predict
    # what export/compress need to rebuild the same val split if the run's splits/ is gone
    assert meta["training"]["val_fraction"] == 0.2 and meta["training"]["val"] is None
    assert "Traceback" not in proc.stderr


def test_evaluate_cli_json(trained_run):
    run, data = trained_run
    proc = vt("evaluate", run.run_dir, data, "--json")
    result = json.loads(proc.stdout)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class", "confusion_matrix",
                "class_names", "num_samples"):
        assert key in result
    assert result["num_samples"] == 30 and sum(map(sum, result["confusion_matrix"])) == 30
    assert set(result["per_class"]) == {"blue", "green", "red"}
    assert (run.model_dir / "confusion_matrix.png").is_file() and (run.model_dir / "misclassified.csv").is_file()
    text = vt("evaluate", run.run_dir, data, "--no-save").stdout
    assert "accuracy" in text and "precision" in text


def test_evaluate_rejects_unknown_classes(trained_run, tmp_path):
    run, _ = trained_run
    other = make_folder(tmp_path / "other")
    (other / "red").rename(other / "magenta")
    proc = vt("evaluate", run.run_dir, other, check=False)
    assert proc.returncode == 2 and "magenta" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_cli_csv_and_json_with_bad_file(trained_run, tmp_path):
    run, data = trained_run
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, src in enumerate(sorted((data / "red").iterdir())[:3]):
        (folder / f"img{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    proc = vt("predict", run.run_dir, folder, "--top-k", "2")
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 4 and "Traceback" not in proc.stderr
    bad = [r for r in rows if r["path"].endswith("broken.jpg")][0]
    assert bad["error"] and not bad["label"]
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in {"blue", "green", "red"} and r["top2_label"] for r in good)
    out = tmp_path / "p.json"
    vt("predict", run.run_dir, str(folder / "*.png"), "--out", out)
    payload = json.loads(out.read_text())
    assert len(payload) == 3 and all(len(r["top_k"]) == 3 for r in payload)


@pytest.mark.timeout(900)
def test_demo_cli_runs(tmp_path):
    proc = vt("demo", "--epochs", "1", "--run-dir", tmp_path / "demo", cwd=tmp_path, timeout=880)
    assert "test accuracy" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("run: ")


@pytest.mark.parametrize("args,needle", [
    (["train", "/no/such/folder"], "data not found"),
    (["train", "{data}", "--model", "no_such_model_xyz"], "unknown model"),
    (["train", "{data}", "--epoch", "3"], "--epochs"),
    (["predict", "/no/such/run", "x.jpg"], "no visiontune model"),
])
def test_errors_are_one_clear_line(image_folder, args, needle):
    proc = vt(*[a.format(data=image_folder) for a in args], check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_resume_after_kill_9(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    epochs = 4
    cmd = [sys.executable, "-m", "visiontune.cli", "train", str(image_folder), "--epochs", str(epochs),
           "--freeze-epochs", "0", "--run-dir", str(run_dir), *FAST_FLAGS, "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = (run_dir / "metrics.csv").read_text().count("\n") - 1 if (run_dir / "metrics.csv").exists() else 0
        if rows >= 1 and any(ckpts.glob("*.ckpt")):
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if not any(ckpts.glob("*.ckpt")):
        pytest.fail("training finished or died before a checkpoint appeared")
    done_before = (run_dir / "metrics.csv").read_text().count("\n") - 1
    assert done_before < epochs, "the run finished before it could be killed"
    vt("train", "--resume", run_dir)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
