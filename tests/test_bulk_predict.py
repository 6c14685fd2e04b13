"""Bulk prediction: streamed CSV output, identical across process counts, resumable."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from visiontune.evaluation.bulk import predict_to_csv


@pytest.fixture()
def inputs(trained_run, tmp_path):
    run, data = trained_run
    files = sorted(str(p) for p in data.rglob("*.png"))
    (tmp_path / "bad.jpg").write_text("not an image")
    return run, files[:14] + [str(tmp_path / "bad.jpg")] + files[14:]


def test_sharded_output_identical_and_in_order(inputs, tmp_path):
    run, files = inputs
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    predict_to_csv(str(run.run_dir), files, one, top_k=2, batch_size=4, workers=0)
    predict_to_csv(str(run.run_dir), files, two, top_k=2, batch_size=4, devices=2)
    a, b = (list(csv.reader(open(p))) for p in (one, two))
    assert len(a) == len(b) == len(files) + 1
    for row_a, row_b in zip(a[1:], b[1:]):
        # same paths, labels, errors; probabilities equal up to float summation order, which
        # oneDNN varies with the thread count (2 threads in one process, 1 in each of two)
        assert [row_a[i] for i in (0, 1, 3, 5, 7)] == [row_b[i] for i in (0, 1, 3, 5, 7)]
        for i in (2, 4, 6):
            assert (row_a[i] == row_b[i] == "") or abs(float(row_a[i]) - float(row_b[i])) < 1e-5
    lines = one.read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == files
    assert lines[15].endswith("not an image (unrecognised format)")


def test_resume_skips_rows_already_written(inputs, tmp_path):
    run, files = inputs
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    predict_to_csv(str(run.run_dir), files, full, batch_size=4, workers=0)
    text = full.read_text()
    cut = text.index("\n", len(text) // 2) + 20  # mid-row: as if killed while writing
    part.write_text(text[:cut])
    written, bad = predict_to_csv(str(run.run_dir), files, part, batch_size=4, workers=0, resume=True)
    assert part.read_text() == text and 0 < written < len(files)


def test_predict_cli_out_resume(inputs, tmp_path):
    run, files = inputs
    out = tmp_path / "cli.csv"
    cmd = [sys.executable, "-m", "visiontune.cli", "predict", str(run.run_dir), *files, "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=280).returncode == 0
    first = out.read_text()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0 and "predicted 0 image(s)" in done.stderr and out.read_text() == first
