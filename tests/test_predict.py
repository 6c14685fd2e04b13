"""Prediction and evaluation on a trained model: prediction rows (one implementation for predict,
bulk predict, evaluate and serve), CSV/JSON output, in-memory inputs, rejection, evaluation that
agrees with prediction, and streamed, sharded, resumable bulk prediction."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, CLASSES, make_folder, make_image, vt_main, write_corrupt_files
from PIL import Image

import visiontune
from visiontune.core.errors import ConfigError
from visiontune.inference.bulk import predict_to_csv
from visiontune.inference.classifier import Classifier
from visiontune.inference.rows import UNKNOWN, csv_cells, csv_header, prediction_rows, probabilities
from visiontune.task import get_task


def test_rows_apply_temperature_top_k_and_rejection():
    logits, single = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.0, 0.05]]), get_task("single")
    rows = prediction_rows(logits, ["a", "b", "c"], temperature=2.0, top_k=2, reject_below=0.4, calibrated=True,
                           paths=["x.png", "y.png"], task=single)
    expected = torch.softmax(logits / 2.0, 1)
    assert rows[0]["label"] == "a" and rows[0]["probability"] == pytest.approx(float(expected[0, 0]))
    assert [t["label"] for t in rows[0]["top_k"]] == ["a", "b"] and rows[0]["calibrated"]
    assert rows[1]["label"] == UNKNOWN and rows[1]["top_k"][0]["label"] == "a"  # rejected, classes still listed
    assert rows[1]["path"] == "y.png" and rows[1]["error"] == ""
    torch.testing.assert_close(probabilities(logits, 2.0, task=single), expected)
    cells = csv_cells(rows[0], 2, ["a", "b", "c"], task=single)
    assert len(cells) == len(csv_header(2, ["a", "b", "c"], task=single)) and cells[:2] == ["x.png", "a"]


def test_reject_below(trained_run):
    run, data = trained_run
    clf = visiontune.load(run.run_dir)
    files = sorted(str(p) for p in (data / "red").iterdir())[:3]
    assert all(r["label"] == "unknown" and r["top_k"] for r in clf.predict(files, reject_below=1.01))
    assert all(r["label"] != "unknown" for r in clf.predict(files, reject_below=0.0))


def test_evaluate_with_and_without_tta(trained_run, capsys):
    """evaluate --tta MODE scores the same images under each mode (each a valid score)."""
    run, data = trained_run
    scores = {}
    for mode in ("none", "flip", "flip-zoom"):
        code, out, err = vt_main(capsys, "evaluate", run.run_dir, data, "--json", "--no-save", "--tta", mode)
        assert code == 0, err
        scores[mode] = json.loads(out)
    assert scores["none"]["num_samples"] == scores["flip"]["num_samples"] == scores["flip-zoom"]["num_samples"] > 0
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in scores.values())


def test_predict_out_csv_caps_top_k_and_keeps_stdout_clean(trained_run, tmp_path, capsys):
    folder = tmp_path / "to predict"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i, colour in enumerate([(210, 40, 40), (40, 190, 40), (40, 40, 210)]):
        make_image(rng, colour).save(folder / f"img {i}.png")
    bad = write_corrupt_files(folder / "sub")
    out = tmp_path / "preds.csv"
    code, stdout, err = vt_main(capsys, "predict", trained_run[0].run_dir, folder, "--top-k", "5", "--out", out,
                                "--workers", "0")
    assert code == 0, err[-3000:]
    assert stdout == ""  # results went to the file
    assert "Traceback" not in err
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


def test_predict_missing_glob_becomes_an_error_row(trained_run, tmp_path):
    from visiontune.cli import main

    out = tmp_path / "p.json"
    assert main(["predict", str(trained_run[0].run_dir), str(tmp_path / "nothing-*.png"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["error"] and rows[0]["label"] == ""


def test_evaluate_json_on_csv_with_unreadable_file(trained_run, tmp_path, capsys):
    from visiontune.cli import main

    data = make_folder(tmp_path / "eval set", per_class=3, seed=11)
    bad = write_corrupt_files(tmp_path / "eval set" / "junk")["text"]
    listing = tmp_path / "eval set" / "labels.csv"
    lines = ["path,label"] + [f"{p.relative_to(listing.parent)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    lines.append(f"{bad.relative_to(listing.parent)},red")
    listing.write_text("\n".join(lines) + "\n")
    assert main(["evaluate", str(trained_run[0].run_dir), str(listing), "--json", "--no-save", "--workers", "0"]) == 0
    stdout = capsys.readouterr().out
    assert len(stdout.strip().splitlines()) == 1  # exactly one JSON object
    result = json.loads(stdout)
    assert result["num_samples"] == 9
    assert [s["path"] for s in result["skipped"]] == [str(bad)]
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 9 and matrix.trace() / 9 == pytest.approx(result["accuracy"])
    assert [result["per_class"][n]["support"] for n in result["class_names"]] == matrix.sum(1).tolist()


def test_evaluate_matches_predict(trained_run, tmp_path):
    data = make_folder(tmp_path / "eval", per_class=4, seed=21)
    result = visiontune.evaluate(trained_run[0].run_dir, data, save=False, workers=0)
    clf = visiontune.load(trained_run[0].run_dir)
    files = sorted(str(p) for p in data.rglob("*.png"))
    rows = clf.predict(files, workers=0)
    correct = sum(r["label"] == Path(f).parent.name for r, f in zip(rows, files))
    assert result["accuracy"] == pytest.approx(correct / len(files))
    assert result["num_samples"] == len(files) and result["class_names"] == clf.class_names


def test_predict_in_memory_inputs_match_paths_and_keep_order(trained_run, tmp_path):
    clf = visiontune.load(trained_run[0].run_dir)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    rng = np.random.default_rng(3)
    for p, colour in zip(paths, [(210, 40, 40), (40, 40, 210), (40, 190, 40)]):
        make_image(rng, colour).save(p)
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
    predict_to_csv(str(run.run_dir), files, two, top_k=2, batch_size=4, processes=2)
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


def test_predict_cli_out_resume(inputs, tmp_path, capsys):
    run, files = inputs
    out = tmp_path / "cli.csv"
    code, _, _ = vt_main(capsys, "predict", run.run_dir, *files, "--out", out)
    assert code == 0
    first = out.read_text()
    code, _, err = vt_main(capsys, "predict", run.run_dir, *files, "--out", out, "--resume")
    assert code == 0 and "predicted 0 image(s)" in err and out.read_text() == first


def test_resume_counts_csv_rows_and_checks_their_paths(trained_run, tmp_path):
    """A file name with a newline is one CSV row, not two; changed inputs are refused, not skipped."""
    import shutil

    from visiontune.core.errors import DataError

    run, data = trained_run
    source = sorted(data.rglob("*.png"))[:6]
    odd = tmp_path / "line\nbreak.png"
    shutil.copy(source[0], odd)
    files = [str(odd)] + [str(p) for p in source[1:]]
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    predict_to_csv(str(run.run_dir), files, full, batch_size=2, workers=0)
    rows = list(csv.reader(open(full, newline="")))
    assert [r[0] for r in rows[1:]] == files  # the newline stays inside its quoted cell
    with open(part, "w", newline="") as fh:  # two complete rows, the first with the newline
        csv.writer(fh, lineterminator="\n").writerows(rows[:3])
    written, _ = predict_to_csv(str(run.run_dir), files, part, batch_size=2, workers=0, resume=True)
    assert written == len(files) - 2 and part.read_text() == full.read_text()
    with pytest.raises(DataError, match="inputs changed"):
        predict_to_csv(str(run.run_dir), list(reversed(files)), part, batch_size=2, workers=0, resume=True)
    with pytest.raises(DataError, match="other columns"):
        predict_to_csv(str(run.run_dir), files, part, top_k=1, batch_size=2, workers=0, resume=True)
    assert part.read_text() == full.read_text()  # refused resumes change nothing


def test_csv_safe_escapes_formula_cells(trained_run, tmp_path, capsys, monkeypatch):
    """A file named like a formula: --csv-safe writes it as text for spreadsheets; without it, as given."""
    import shutil

    run, data = trained_run
    shutil.copy(next(data.rglob("*.png")), tmp_path / "=cmd()+1.png")
    monkeypatch.chdir(tmp_path)
    code, out, _ = vt_main(capsys, "predict", run.run_dir, "=cmd()+1.png", "--csv-safe")
    assert code == 0 and next(csv.reader(out.splitlines()[1:]))[0] == "'=cmd()+1.png"
    code, _, _ = vt_main(capsys, "predict", run.run_dir, "=cmd()+1.png", "--out", "p.csv", "--csv-safe")
    assert code == 0 and list(csv.reader(open("p.csv")))[1][0] == "'=cmd()+1.png"
    code, _, _ = vt_main(capsys, "predict", run.run_dir, "=cmd()+1.png", "--out", "q.csv")
    assert code == 0 and list(csv.reader(open("q.csv")))[1][0] == "=cmd()+1.png"


# --- multi-label models -----------------------------------------------------------------------------


def test_run_tunes_thresholds_and_predicts_label_sets(ml_run, ml_data):
    card = json.loads((ml_run.model_dir / "model.json").read_text())
    assert card["inference"]["task"] == "multi" and len(card["inference"]["thresholds"]) == len(CLASSES)
    assert {"macro_map", "micro_f1"} <= set(ml_run.metrics["val"])
    clf = Classifier.load(ml_run.run_dir)
    assert clf.thresholds == card["inference"]["thresholds"]  # round trip through model.json
    files = sorted(str(p) for p in (ml_data.parent / "img").glob("*.png"))[:6]
    rows = clf.predict(files, top_k=2)
    logits, _, _ = clf.logits_of(files)
    assert card["calibration"]["decisions"] == card["calibration"]["num_val"] * len(CLASSES)
    probs = torch.sigmoid(logits / clf.temperature)  # calibrated over every val label decision
    for row, p in zip(rows, probs):
        assert row["labels"] == [n for n, v, t in zip(clf.class_names, p.tolist(), clf.thresholds) if v >= t]
        assert [row["scores"][n] for n in clf.class_names] == pytest.approx(p.tolist(), abs=1e-6)
        assert len(row["top_k"]) == 2
    everything = clf.predict(files, threshold=0.0)
    assert all(r["labels"] == clf.class_names for r in everything)
    with pytest.raises(ConfigError, match="--threshold"):
        clf.predict(files, reject_below=0.5)


def test_single_label_model_refuses_threshold(trained_run):
    run, data = trained_run
    with pytest.raises(ConfigError, match="--reject-below"):
        visiontune.load(run.run_dir).predict([next(data.rglob("*.png"))], threshold=0.5)
