"""CLI and prediction details beyond test_cli.py: kill -9 resume across the frozen warm-up, the
lr-find subcommand, predict --out CSV, evaluate on a CSV with a bad file, in-memory inputs, and
no stray run dirs after a failed start."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontune
from visiontune.cli import main
from vt_support import CLASS_NAMES, TINY_FLAGS, cli, colour_image, make_image_folder, write_corrupt_files


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=280, **kw)


@pytest.fixture(scope="module")
def model_run(trained_run):
    """The shared trained run from conftest (a Run, or a (Run, data) pair)."""
    return trained_run[0] if isinstance(trained_run, tuple) else trained_run


def metric_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh) if r.get("epoch")]


def test_resume_after_kill_9_across_the_frozen_warmup(tmp_path):
    """Default finetune (epoch 1 = frozen warm-up on cached features, then Lightning epochs):
    kill -9 after the first Lightning epoch, resume, and every epoch appears exactly once."""
    data = make_image_folder(tmp_path / "my data", per_class=8)
    run_dir = tmp_path / "run dir"
    epochs = 4
    proc = subprocess.Popen(cli("train", data, "--epochs", epochs, "--run-dir", run_dir, *TINY_FLAGS),
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

    resumed = run_cli("train", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == f"run: {run_dir}"
    assert "Traceback" not in resumed.stderr
    assert metric_epochs(run_dir) == list(range(1, epochs + 1))
    clf = visiontune.load(run_dir)
    assert clf.class_names == CLASS_NAMES
    assert 1 <= clf.meta["metrics"]["epoch"] <= epochs


def test_lr_find_subcommand(tmp_path, capsys):
    data = make_image_folder(tmp_path / "my data", per_class=8)
    run_dir = tmp_path / "lr find"
    assert main(["lr-find", str(data), "--steps", "8", "--run-dir", str(run_dir), *TINY_FLAGS]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run: {run_dir}"
    assert (run_dir / "lr_find.png").stat().st_size > 0


def test_predict_out_csv_caps_top_k_and_keeps_stdout_clean(model_run, tmp_path):
    folder = tmp_path / "to predict"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i, colour in enumerate([(210, 40, 40), (40, 190, 40), (40, 40, 210)]):
        colour_image(colour, rng).save(folder / f"img {i}.png")
    bad = write_corrupt_files(folder / "sub")
    out = tmp_path / "preds.csv"
    proc = run_cli("predict", model_run.run_dir, folder, "--top-k", "5", "--out", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # results went to the file
    assert "Traceback" not in proc.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["path", "label", "probability"] and header[-1] == "error"
    assert "top3_label" in header and "top4_label" not in header  # 5 asked, 3 classes exist
    assert len(rows) == 6
    by_path = {r["path"]: r for r in rows}
    for p in bad.values():
        assert by_path[str(p)]["error"] and by_path[str(p)]["label"] == ""
    for r in rows:
        if not r["error"]:
            assert r["label"] == r["top1_label"] in CLASS_NAMES
            probs = [float(r[f"top{i}_probability"]) for i in (1, 2, 3)]
            assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_predict_missing_glob_becomes_an_error_row(model_run, tmp_path):
    """In process (the subprocess path is covered above and in test_cli.py)."""
    out = tmp_path / "p.json"
    assert main(["predict", str(model_run.run_dir), str(tmp_path / "nothing-*.png"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["error"] and rows[0]["label"] == ""


def test_evaluate_json_on_csv_with_unreadable_file(model_run, tmp_path, capsys):
    data = make_image_folder(tmp_path / "eval set", per_class=3, seed=11)
    bad = write_corrupt_files(tmp_path / "eval set" / "junk")["text"]
    listing = tmp_path / "eval set" / "labels.csv"
    lines = ["path,label"] + [f"{p.relative_to(listing.parent)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    lines.append(f"{bad.relative_to(listing.parent)},red")
    listing.write_text("\n".join(lines) + "\n")
    assert main(["evaluate", str(model_run.run_dir), str(listing), "--json", "--no-save", "--workers", "0"]) == 0
    stdout = capsys.readouterr().out
    assert len(stdout.strip().splitlines()) == 1  # exactly one JSON object
    result = json.loads(stdout)
    assert result["num_samples"] == 9
    assert [s["path"] for s in result["skipped"]] == [str(bad)]
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 9 and matrix.trace() / 9 == pytest.approx(result["accuracy"])
    assert [result["per_class"][n]["support"] for n in result["class_names"]] == matrix.sum(1).tolist()


def test_evaluate_matches_predict(model_run, tmp_path):
    data = make_image_folder(tmp_path / "eval", per_class=4, seed=21)
    result = visiontune.evaluate(model_run.run_dir, data, save=False, workers=0)
    clf = visiontune.load(model_run.run_dir)
    files = sorted(str(p) for p in data.rglob("*.png"))
    rows = clf.predict(files, workers=0)
    correct = sum(r["label"] == Path(f).parent.name for r, f in zip(rows, files))
    assert result["accuracy"] == pytest.approx(correct / len(files))
    assert result["num_samples"] == len(files) and result["class_names"] == clf.class_names


def test_predict_in_memory_inputs_match_paths_and_keep_order(model_run, tmp_path):
    clf = visiontune.load(model_run.run_dir)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    rng = np.random.default_rng(3)
    for p, colour in zip(paths, [(210, 40, 40), (40, 40, 210), (40, 190, 40)]):
        colour_image(colour, rng).save(p)
    inputs = [paths[0], Image.open(paths[1]), b"not an image", paths[2].read_bytes()]
    rows = clf.predict(inputs, top_k=3)
    reference = clf.predict([paths[0], paths[1], paths[2]], top_k=3)
    assert [r["error"] == "" for r in rows] == [True, True, False, True]
    for got, want in zip([rows[0], rows[1], rows[3]], reference):
        assert got["label"] == want["label"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
    assert rows[0]["path"] == str(paths[0]) and rows[1]["path"] == "" and rows[2]["label"] == ""
    single = clf.predict(paths[0])  # a single input, not a list
    assert len(single) == 1 and single[0]["label"] == rows[0]["label"]


@pytest.mark.parametrize("argv", [["train", "{missing}"], ["train", "{data}", "--model", "no_such_model_xyz"]],
                         ids=["missing-data", "unknown-model"])
def test_failed_start_leaves_no_run_dir(tmp_path, monkeypatch, capsys, argv):
    data = make_image_folder(tmp_path / "my data", per_class=2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main([a.format(missing=tmp_path / "missing", data=data) for a in argv] + TINY_FLAGS)
    assert code == 2
    assert "error" in capsys.readouterr().err
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())


@pytest.mark.parametrize("sub", ["train", "evaluate", "predict", "demo", "lr-find"])
def test_help_of_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    assert f"usage: visiontune {sub}" in capsys.readouterr().out
