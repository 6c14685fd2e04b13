"""Multi-label classification: both CSV formats, task detection, the split, thresholds, metrics
against scikit-learn, every strategy, and the CLI end to end (train -> predict -> evaluate)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, FAST, make_folder, make_multilabel, save_image
from PIL import Image

import visiontune
from visiontune.core.errors import ArtifactError, ConfigError, DataError
from visiontune.data.labels import label_names, stack_targets
from visiontune.data.multilabel import iterative_split
from visiontune.data.scan import discover, discover_eval, read_split_csv, write_split_csv
from visiontune.evaluation.multilabel import best_f1_threshold, multilabel_metrics, tune_thresholds
from visiontune.inference.classifier import Classifier
from visiontune.models.card import ModelCard
from visiontune.training.config import TrainConfig
from visiontune.training.registry import PROBE_HEADS, STRATEGIES


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("fmt,delim", [("labels", " "), ("labels", "|"), ("onehot", " ")])
def test_each_input_format_gives_the_same_label_sets(tmp_path, fmt, delim):
    csv_path = make_multilabel(tmp_path / "d", n=24, fmt=fmt, delim=delim)
    splits = discover(csv_path, task="auto", label_delim=delim, scan=False)
    assert splits.task == "multi" and splits.class_names == sorted(CLASSES)
    reference = discover(make_multilabel(tmp_path / "ref", n=24), scan=False)
    got = {Path(p).name: label_names(y, splits.class_names) for p, y in splits.train + splits.val}
    want = {Path(p).name: label_names(y, reference.class_names) for p, y in reference.train + reference.val}
    assert got == want
    assert any(not labels for labels in got.values()), "images with no label are valid samples"
    assert "multi-label" in splits.task_note


def test_single_label_csv_is_still_single_label(tmp_path, shared_folder):
    csv_path = tmp_path / "single.csv"
    rows = [(str(p), p.parent.name) for p in sorted(shared_folder.rglob("*.png"))]
    with open(csv_path, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    splits = discover(csv_path)
    assert splits.task == "single" and isinstance(splits.train[0][1], int)
    assert splits.task_note.startswith("task: single-label")


def test_auto_keeps_class_names_with_spaces_single_label(tmp_path):
    for name in ("a", "b", "c", "d"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / f"{name}.png")
    (tmp_path / "breeds.csv").write_text("a.png,golden retriever\nb.png,pug\nc.png,golden retriever\nd.png,pug\n")
    splits = discover(tmp_path / "breeds.csv", scan=False)
    assert splits.task == "single" and splits.class_names == ["golden retriever", "pug"]
    assert "--task multi" in splits.task_note
    (tmp_path / "tags.csv").write_text("a.png,cat dog\nb.png,cat\nc.png,dog\nd.png,dog\n")  # parts found alone
    assert discover(tmp_path / "tags.csv", scan=False).task == "multi"


def test_task_single_refuses_multi_label_rows_and_multi_refuses_folders(tmp_path, shared_folder):
    csv_path = make_multilabel(tmp_path / "d", n=12)
    with pytest.raises(DataError, match="--task multi"):
        discover(csv_path, task="single", scan=False)
    with pytest.raises(DataError, match="CSV"):
        discover(shared_folder, task="multi", scan=False)


def test_duplicate_rows_of_one_image_merge_into_one_sample(tmp_path):
    save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    save_image(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("path,labels\na.png,cat\na.png,dog\nb.png,\n")
    splits = discover(tmp_path / "l.csv", val_fraction=0.5)
    samples = {Path(p).name: label_names(y, splits.class_names) for p, y in splits.train + splits.val}
    assert samples == {"a.png": ["cat", "dog"], "b.png": []}


def test_split_keeps_every_label_in_train_and_val():
    rng = np.random.default_rng(0)
    common = (rng.random((200, 6)) < 0.4).astype(np.float32)
    rare = np.zeros((200, 3), dtype=np.float32)
    rare[[5, 77], 0] = 1  # two images: one must go to each side
    rare[[1, 50, 120], 1] = 1
    rare[[9, 10, 11, 12], 2] = 1
    targets = torch.from_numpy(np.concatenate([common, rare], 1))
    train, val = iterative_split(targets, 0.2, seed=3)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert abs(len(val) - 40) <= 2
    for label in range(targets.shape[1]):
        assert targets[train, label].sum() > 0 and targets[val, label].sum() > 0, label
    assert iterative_split(targets, 0.2, seed=3) == (train, val)  # seeded


def test_split_csv_round_trips_label_sets(tmp_path):
    names = ["cat", "dog", "car"]
    samples = [("/x/a.png", torch.tensor([1.0, 0.0, 1.0])), ("/x/b.png", torch.zeros(3))]
    write_split_csv(samples, names, tmp_path / "val.csv")
    back = read_split_csv(tmp_path / "val.csv", names)
    assert [p for p, _ in back] == ["/x/a.png", "/x/b.png"]
    assert torch.equal(stack_targets([y for _, y in back]), stack_targets([y for _, y in samples]))


def test_unknown_labels_in_evaluation_data_are_named(tmp_path):
    save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / "e.csv").write_text("path,labels\na.png,cat zebra\n")
    with pytest.raises(DataError, match="zebra"):
        discover_eval(tmp_path / "e.csv", ["cat", "dog"], task="multi")


# ----------------------------------------------------------------------------- thresholds and metrics
def test_best_f1_threshold_separates_where_f1_is_highest():
    probs = torch.tensor([0.9, 0.8, 0.35, 0.3, 0.1])
    target = torch.tensor([1, 1, 1, 0, 0])
    threshold, f1 = best_f1_threshold(probs, target)
    assert 0.3 < threshold < 0.35 and f1 == pytest.approx(1.0)
    # a label too rare on val falls back to the threshold shared by all decisions
    many = torch.tensor([[0.9, 0.6], [0.8, 0.2], [0.7, 0.1], [0.2, 0.3], [0.6, 0.05], [0.65, 0.4]])
    y = torch.tensor([[1, 1], [1, 0], [1, 0], [0, 0], [1, 0], [1, 0]])
    thresholds = tune_thresholds(many, y, min_support=2)
    assert thresholds[1] == best_f1_threshold(many.flatten(), y.flatten())[0]
    assert thresholds[0] == best_f1_threshold(many[:, 0], y[:, 0])[0]


def test_metrics_equal_sklearn_on_a_fixed_example():
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

    probs = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.8, 0.4], [0.7, 0.6, 0.1], [0.3, 0.2, 0.9], [0.1, 0.3, 0.2]])
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    thresholds = [0.5, 0.5, 0.3]
    m = multilabel_metrics(probs, target, ["a", "b", "c"], thresholds)
    y, p = target.numpy(), probs.numpy()
    pred = (p >= np.array(thresholds)).astype(int)
    assert m["macro_map"] == pytest.approx(average_precision_score(y, p, average="macro"), abs=1e-6)
    assert m["micro_map"] == pytest.approx(average_precision_score(y, p, average="micro"), abs=1e-6)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert m["example_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=0), abs=1e-6)
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert m["per_label"]["c"]["support"] == 2 and m["per_label"]["c"]["threshold"] == 0.3


def test_card_validates_task_and_thresholds():
    base = {"format": "visiontune-model", "class_names": ["a", "b"],
            "architecture": {"source": "timm", "name": "resnet18", "num_classes": 2, "classifier": "fc"},
            "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    card = ModelCard.from_dict({**base, "inference": {"task": "multi", "thresholds": [0.3, 0.7]}})
    assert card.multi_label and card.thresholds == [0.3, 0.7]
    assert ModelCard.from_dict(card.to_dict()).thresholds == [0.3, 0.7]
    assert ModelCard.from_dict({**base, "inference": {"task": "multi"}}).thresholds == [0.5, 0.5]
    for bad in ({"task": "multi", "thresholds": [0.3]}, {"task": "multi", "thresholds": [0.3, 1.5]},
                {"task": "multi", "thresholds": [0.3, "x"]}, {"thresholds": [0.3, 0.7]}, {"task": "many"}):
        with pytest.raises(ArtifactError):
            ModelCard.from_dict({**base, "inference": bad})


# ----------------------------------------------------------------------------- training and inference
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


@pytest.mark.parametrize("strategy,head", [(s, "linear") for s in STRATEGIES if s != "finetune"]
                         + [("linear-probe", h) for h in PROBE_HEADS if h != "linear"])
def test_every_strategy_trains_multi_label(ml_data, tmp_path, strategy, head):
    run = visiontune.train(ml_data, strategy=strategy, head=head, epochs=2, freeze_epochs=1,
                           run_dir=str(tmp_path / "run"), **FAST)
    clf = Classifier.load(run.run_dir)
    assert clf.multi_label and len(clf.thresholds) == len(CLASSES)
    assert 0.0 <= run.metrics["val"]["macro_map"] <= 1.0
    assert set(clf.predict([next((ml_data.parent / "img").glob("*.png"))])[0]["scores"]) == set(CLASSES)


@pytest.mark.parametrize("options", [{"mixup": 0.4, "cutmix": 1.0}, {"balance": "sampler"}])
def test_mixup_and_the_sampler_train_multi_label(ml_data, tmp_path, options):
    run = visiontune.train(ml_data, run_dir=str(tmp_path / "run"), **{**FAST, "batch_size": 4, **options})
    assert all(TrainConfig.load(run.run_dir / "config.yaml").get(k) == v for k, v in options.items())
    assert 0.0 <= run.metrics["val"]["macro_map"] <= 1.0 and Classifier.load(run.run_dir).multi_label


def test_multi_label_mixup_mixes_multi_hot_targets_by_one_lambda():
    from visiontune.training.module import ClassifierModule
    from visiontune.training.optim import OptimizerSettings, ScheduleSettings

    module = ClassifierModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), "1", [], [],
                              OptimizerSettings(), ScheduleSettings(), mixup=(0.4, 0.0), multi_label=True)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    _, soft = module.mixup_fn(torch.rand(4, 3, 2, 2), y)
    lam = 1 - float(soft[0, 1])  # row 0 = lam * y[0] + (1 - lam) * y[3], and only y[3] has label 1
    assert torch.allclose(soft, lam * y + (1 - lam) * y.flip(0))


def test_balanced_sampler_draws_by_the_rarest_label():
    from visiontune.training.context import TrainContext

    samples = [("a", torch.tensor([1.0, 0.0, 0.0])), ("b", torch.tensor([1.0, 1.0, 0.0])),
               ("c", torch.tensor([0.0, 0.0, 0.0])), ("d", torch.tensor([1.0, 0.0, 1.0]))]
    ctx = TrainContext.__new__(TrainContext)
    ctx.cfg = TrainConfig.from_dict({"data": "x", "balance": "sampler"})
    ctx.splits = type("S", (), {"train": samples, "class_names": ["p", "q", "r"], "task": "multi"})()
    weights = ctx.sample_weights()  # counts: p 3, q 1, r 1; one image with no label
    assert weights.tolist() == [1 / 3, 1.0, 1.0, 1.0]


def test_unsupported_options_are_refused_by_name(ml_data, tmp_path):
    with pytest.raises(ConfigError, match="balanced_accuracy is for single-label"):
        visiontune.train(ml_data, select_metric="balanced_accuracy", run_dir=str(tmp_path / "a"), **FAST)
    single = make_folder(tmp_path / "f", per_class=3)
    with pytest.raises(ConfigError, match="multi-label"):
        visiontune.train(single, select_metric="map", run_dir=str(tmp_path / "c"), **FAST)
    assert not any((tmp_path / name).exists() for name in "ac")


# ----------------------------------------------------------------------------- export and serve
def test_onnx_export_keeps_label_decisions_and_the_client_agrees(ml_run, ml_data, tmp_path):
    import subprocess
    import sys

    from visiontune.export.exporter import export_model

    report = export_model(ml_run.run_dir, "onnx", out=tmp_path / "onnx" / "model.onnx")
    assert report["label_agreement"] >= 0.995 and report["passed"]
    onnx_file = Path(report["file"])
    files = sorted(str(p) for p in (ml_data.parent / "img").glob("*.png"))[:8]
    eager = visiontune.load(ml_run.run_dir).predict(files)
    exported = visiontune.load(onnx_file)
    assert exported.multi_label and exported.thresholds == pytest.approx(Classifier.load(ml_run.run_dir).thresholds)
    assert [r["labels"] for r in exported.predict(files)] == [r["labels"] for r in eager]
    client = Path(__file__).resolve().parents[1] / "examples" / "onnx_client.py"
    out = subprocess.run([sys.executable, str(client), str(onnx_file), *files, "--label-delim", ";"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("path,labels")
    assert [line.split(",")[1] for line in out[1:]] == [";".join(r["labels"]) for r in eager]


def test_serve_answers_with_label_sets(ml_run, ml_data):
    import httpx
    from test_serve import running_server

    clf = visiontune.load(ml_run.run_dir)
    image = sorted((ml_data.parent / "img").glob("*.png"))[1]
    want = clf.predict([str(image)])[0]
    with running_server(clf) as url:
        got = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image.read_bytes())}, timeout=30).json()
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
    row = got["predictions"][0]
    assert row["labels"] == want["labels"] and set(row["scores"]) == set(CLASSES)
    assert row["scores"] == pytest.approx(want["scores"], abs=1e-5)
    assert info["task"] == "multi" and set(info["thresholds"]) == set(CLASSES)


def test_data_check_counts_labels_pairs_and_searches_label_errors(tmp_path, capsys):
    from conftest import vt_main

    data = make_multilabel(tmp_path / "my data", n=30)
    rows = list(csv.reader(open(data)))[1:]
    code, out, _ = vt_main(capsys, "data", "check", str(data), "--json", "--workers", "0")
    report = json.loads(out)
    assert code == 0 and report["task"] == "multi"
    for name in CLASSES:
        assert report["classes"][name]["train"] == sum(name in r[1].split() for r in rows)
    pairs = {tuple(p["labels"]): p["images"] for p in report["cooccurrence"]}
    assert pairs[("blue", "red")] == sum({"blue", "red"} <= set(r[1].split()) for r in rows)
    assert sum(report["labels_per_image"].values()) == 30
    assert report["label_check"]["method"].startswith("cleanlab.multilabel_classification")
    paths = {str(data.parent / r[0]) for r in rows}
    assert all(issue["path"] in paths and set(issue["suggested"]) <= set(CLASSES) for issue in report["label_issues"])


def test_calibration_over_label_decisions_softens_an_overconfident_model():
    from visiontune.evaluation.calibration import label_decisions, multilabel_calibration

    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(400, 4, generator=gen) < 0.3).float()
    honest = torch.where(target > 0, 1.0, -1.0) + torch.randn(400, 4, generator=gen)  # noisy evidence
    cal = multilabel_calibration(honest * 6, target)  # six times too sharp
    assert cal["temperature"] > 1.0 and cal["ece_after"] < cal["ece_before"]
    assert cal["decisions"] == 1600 and cal["num_val"] == 400
    z, y = label_decisions(honest, target)
    assert torch.allclose(torch.softmax(z, 1)[:, 1].float(), torch.sigmoid(honest).reshape(-1), atol=1e-6)
    assert torch.equal(y, target.reshape(-1).long())


def test_report_has_the_multi_label_sections(ml_run):
    from visiontune.evaluation.report import write_report

    page = write_report(ml_run.run_dir, gradcam=True).read_text()
    for sid in ("per-label", "label-pairs", "label-errors", "gradcam", "calibration", "curves", "dataset"):
        assert f'<section id="{sid}">' in page, sid
    assert "Every (image, label) decision counts once" in page and 'id="confusion"' not in page
    for name in CLASSES:
        assert f"<td class=\"l\">{name}</td>" in page


def test_int8_compress_is_guarded_on_map_and_pruning_keeps_a_multi_label_model(ml_run, ml_data, tmp_path):
    from visiontune.export.compress import compress

    report = compress(ml_run.run_dir, quantize="int8", out=tmp_path / "c", budget_s=0.2, force=True, log=lambda m: None)
    eager, onnx, int8 = report["variants"][:3]
    assert "val_map" in eager and "val_accuracy" not in eager
    assert onnx["label_agreement"] >= 0.995 and "map_change_pts" in int8
    assert report["int8_attempts"][-1]["map_change_pts"] == int8["map_change_pts"]
    assert visiontune.load(Path(int8["file"])).multi_label
    pruned = compress(ml_run.run_dir, prune=0.3, finetune_epochs=1, out=tmp_path / "p", budget_s=0.2, force=True,
                      log=lambda m: None)
    row = next(v for v in pruned["variants"] if v["variant"] == "pruned")
    assert row["macs"] < pruned["pruning"]["macs_before"] and 0.0 <= row["val_map"] <= 1.0
    clf = visiontune.load(tmp_path / "p" / "pruned")
    assert clf.multi_label and clf.thresholds == visiontune.load(ml_run.run_dir).thresholds
    assert set(clf.predict([next((ml_data.parent / "img").glob("*.png"))])[0]["scores"]) == set(CLASSES)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_bulk_predict_writes_the_same_label_sets_as_predict(ml_run, ml_data, tmp_path):
    import os
    import subprocess
    import sys

    from visiontune.export.exporter import export_model

    onnx_file = Path(export_model(ml_run.run_dir, "onnx", out=tmp_path / "onnx" / "model.onnx",
                                   dynamic_batch=True)["file"])
    files = sorted(str(p) for p in (ml_data.parent / "img").glob("*.png"))[:10]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(files) + "\n")
    script = Path(__file__).resolve().parents[1] / "examples" / "ray_predict.py"
    done = subprocess.run([sys.executable, str(script), str(onnx_file), str(listing), "--out", str(tmp_path / "out"),
                           "--num-cpus", "2", "--batch-size", "4"], capture_output=True, text=True, timeout=380,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    expected = visiontune.load(onnx_file).predict(files)
    assert [r["labels"] for r in rows] == [" ".join(e["labels"]) for e in expected]
    assert {f"p_{c}" for c in CLASSES} <= set(rows[0])


# ----------------------------------------------------------------------------- resume and DDP
def _train_cmd(*args) -> list[str]:
    import sys

    return [sys.executable, "-m", "visiontune.cli", "train", *map(str, args), "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--no-report", "--no-progress"]


@pytest.mark.timeout(600)
def test_sigterm_then_resume_completes_a_multi_label_run(ml_data, tmp_path):
    import signal
    import subprocess
    import time

    from visiontune.cli import main

    run_dir = tmp_path / "ml run"
    proc = subprocess.Popen(_train_cmd(ml_data, "--epochs", 3, "--freeze-epochs", 0, "--run-dir", run_dir),
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
    assert clf.multi_label and len(clf.thresholds) == len(CLASSES)


@pytest.mark.timeout(900)
def test_two_process_ddp_trains_multi_label(ml_data, tmp_path):
    """Two gloo processes: the run completes once, and the card's val macro mAP is what a
    single-process evaluation of the saved model on the run's own val split gives."""
    import subprocess

    run_dir = tmp_path / "ddp run"
    proc = subprocess.run(_train_cmd(ml_data, "--devices", 2, "--epochs", 2, "--freeze-epochs", 0, "--run-dir",
                                     run_dir), capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1
    card = json.loads((run_dir / "model" / "model.json").read_text())
    assert card["inference"]["task"] == "multi"
    result = visiontune.evaluate(run_dir, run_dir / "splits" / "val.csv", save=False)
    assert result["macro_map"] == pytest.approx(card["metrics"]["val"]["macro_map"], abs=1e-4)
