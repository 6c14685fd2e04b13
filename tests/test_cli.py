"""One end-to-end test per subcommand through the CLI (the console entry point once, in a
subprocess; the rest through ``visiontune.cli.main`` in this process), one-line errors, help."""

from __future__ import annotations

import csv
import io
import json

import pytest
from conftest import FAST, FAST_FLAGS, make_folder, vt, vt_main

from visiontune.evaluation.report import write_report

SUBCOMMANDS = ["train", "lr-find", "compare", "evaluate", "predict", "report", "data check", "export", "compress",
               "serve", "demo"]


def test_train_through_the_console_script_in_a_path_with_spaces(image_folder, tmp_path):
    run_dir = tmp_path / "out dir" / "run"
    proc = vt("train", image_folder, "--epochs", "1", "--run-dir", run_dir, *FAST_FLAGS)
    assert proc.stdout.strip().splitlines()[-1] == f"run: {run_dir}"
    assert (run_dir / "model" / "model.json").is_file()
    assert (run_dir / "report.html").is_file()  # written automatically at the end of train
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert meta["calibration"]["temperature"] > 0  # fitted on val, used by predict
    # what export/compress need to rebuild the same val split if the run's splits/ is gone
    assert meta["training"]["val_fraction"] == 0.2 and meta["training"]["val"] is None
    for name in ("config.yaml", "metrics.csv", "curves.png", "skipped_files.txt", "splits/train.csv",
                 "splits/val.csv"):
        assert (run_dir / name).exists(), name
    assert "Traceback" not in proc.stderr


def test_evaluate_cli_json(trained_run, tmp_path, capsys):
    run, data = trained_run
    # --out: the shared session run stays untouched (other tests expect its model/ as trained)
    code, out, _ = vt_main(capsys, "evaluate", run.run_dir, data, "--json", "--out", tmp_path / "eval")
    result = json.loads(out)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class", "confusion_matrix",
                "class_names", "num_samples"):
        assert key in result
    assert result["num_samples"] == 30 and sum(map(sum, result["confusion_matrix"])) == 30
    assert set(result["per_class"]) == {"blue", "green", "red"}
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {"confusion_matrix.png", "misclassified.csv"}
    assert not (run.model_dir / "confusion_matrix.png").exists()
    code, text, _ = vt_main(capsys, "evaluate", run.run_dir, data, "--no-save")
    assert code == 0 and "accuracy" in text and "precision" in text


def test_evaluate_rejects_unknown_classes(trained_run, tmp_path, capsys):
    run, _ = trained_run
    other = make_folder(tmp_path / "other", per_class=2)
    (other / "red").rename(other / "magenta")
    code, _, err = vt_main(capsys, "evaluate", run.run_dir, other)
    assert code == 2 and "magenta" in err


def test_predict_cli_csv_and_json_with_bad_file(trained_run, tmp_path, capsys):
    run, data = trained_run
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, src in enumerate(sorted((data / "red").iterdir())[:3]):
        (folder / f"img{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    code, out, _ = vt_main(capsys, "predict", run.run_dir, folder, "--top-k", "2")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 4
    bad = [r for r in rows if r["path"].endswith("broken.jpg")][0]
    assert bad["error"] and not bad["label"]
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in {"blue", "green", "red"} and r["top2_label"] for r in good)
    out_json = tmp_path / "p.json"
    vt_main(capsys, "predict", run.run_dir, str(folder / "*.png"), "--out", out_json)
    payload = json.loads(out_json.read_text())
    assert len(payload) == 3 and all(len(r["top_k"]) == 3 for r in payload)


def test_lr_find_subcommand(shared_folder, tmp_path, capsys):
    run_dir = tmp_path / "lr find"
    code, out, _ = vt_main(capsys, "lr-find", shared_folder, "--steps", "8", "--run-dir", run_dir, *FAST_FLAGS[:-1])
    assert code == 0 and out.strip().splitlines()[-1] == f"run: {run_dir}"
    assert (run_dir / "lr_find.png").stat().st_size > 0
    assert "time budget" not in out and not (run_dir / "plan.json").exists()  # a sweep of steps is never planned


def test_compare_writes_table_and_report_shows_it(shared_folder, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, out, err = vt_main(capsys, "compare", shared_folder, "--strategies", "linear-probe,finetune", "--epochs",
                             "1", "--run-dir", out_dir, *FAST_FLAGS)
    assert code == 0, err
    table = out.strip().splitlines()[-3:]
    assert table[0].split()[:3] == ["strategy", "model", "accuracy"]
    assert [line.split()[0] for line in table[1:]] == ["linear-probe", "finetune"]
    rows = list(csv.DictReader(open(out_dir / "compare.csv")))
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["model_size_mb"]) > 1 for r in rows)
    html = write_report(rows[0]["run_dir"], gradcam=False).read_text()
    assert "Strategy comparison" in html


def test_compare_api_refuses_options_it_sets_itself(shared_folder):
    from visiontune.core.errors import ConfigError
    from visiontune.pipeline.compare import compare

    with pytest.raises(ConfigError, match="--strategies"):
        compare(shared_folder, ["finetune"], strategy="scratch", **FAST)
    with pytest.raises(ConfigError, match="resume"):
        compare(shared_folder, ["finetune"], resume="runs/x", **FAST)


def test_compare_refuses_an_option_one_entry_cannot_honour_before_any_entry_trains(shared_folder, tmp_path):
    from visiontune.core.errors import ConfigError
    from visiontune.pipeline.compare import compare

    with pytest.raises(ConfigError, match="--devices.*--strategy finetune"):  # progressive trains in one process
        compare(shared_folder, ["finetune", "progressive"], devices=2, run_dir=str(tmp_path / "cmp"), **FAST)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("args,needle", [
    (["train", "/no/such/folder"], "data not found"),
    (["train", "{data}", "--model", "no_such_model_xyz"], "unknown model"),
    (["train", "{data}", "--epoch", "3"], "--epochs"),
    (["predict", "/no/such/run", "x.jpg"], "no visiontune model"),
    (["evaluate", "/no/such/run", "{data}"], "no visiontune model"),
    (["evaluate", "/no/such/run", "/no/such/folder"], "data not found"),  # the data before any model work
    (["serve", "/no/such/run"], "no model at"),
    (["export", "/no/such/run"], "no visiontune model"),
])
def test_errors_are_one_clear_line(image_folder, capsys, args, needle):
    code, _, err = vt_main(capsys, *[a.format(data=image_folder) for a in args])
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["train", "{missing}"], ["train", "{data}", "--model", "no_such_model_xyz"]],
                         ids=["missing-data", "unknown-model"])
def test_failed_start_leaves_no_run_dir(tmp_path, monkeypatch, capsys, argv):
    data = make_folder(tmp_path / "my data", per_class=2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = vt_main(capsys, *[a.format(missing=tmp_path / "missing", data=data) for a in argv], *FAST_FLAGS)
    assert code == 2 and "error" in err
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_every_subcommand(sub, capsys):
    code, out, _ = vt_main(capsys, *sub.split(), "--help")
    assert code == 0 and f"usage: visiontune {sub}" in out
