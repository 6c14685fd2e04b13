"""Export (ONNX / TorchScript / timm-HF / OpenVINO) parity, the ONNX backend, the CLI export
command, and clear errors for bad ONNX files (compress, int8 and pruning: test_compress.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, vt_main

import visiontune
from visiontune.core.errors import ExportError
from visiontune.export.exporter import export_model
from visiontune.export.parity import check_parity
from visiontune.export.registry import EXPORT_FORMATS
from visiontune.inference.classifier import Classifier
from visiontune.inference.runners import OnnxRunner
from visiontune.models.card import ModelCard


@pytest.mark.parametrize("fmt", EXPORT_FORMATS.names())
def test_export_parity_for_every_format(tiny_model, tmp_path, fmt):
    report = export_model(tiny_model[0], fmt, out=tmp_path / fmt / EXPORT_FORMATS.get(fmt).file_name)
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] <= 1e-3
    assert "validation images" in report["source"]
    folder = Path(report["file"]).parent
    assert json.loads((folder / "export_report.json").read_text())["passed"]
    assert json.loads((folder / "model.json").read_text())["export"]["format"] == fmt


def test_hf_layout_loads_with_timm_alone(tiny_model, tmp_path):
    import timm

    export_model(tiny_model[0], "hf", out=tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 3
    assert config["label_names"] == ["blue", "green", "red"]
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and "crop_pct" in config["pretrained_cfg"]
    model = timm.create_model("local-dir:" + str(tmp_path / "hf"), pretrained=True).eval()
    reference = Classifier.load(tiny_model[0], precision="32")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference.model.float()(x), atol=1e-4, rtol=0)


def test_hf_refuses_torchvision_models(tmp_path):
    from visiontune.export.hf_export import export_hf
    from visiontune.models.factory import build_model

    model, arch, pre = build_model("torchvision:resnet18", 2, weights="none")
    with pytest.raises(ExportError, match="timm architecture"):
        export_hf(model, ModelCard(["a", "b"], pre, arch), tmp_path)


def test_onnx_metadata_and_predict_match_eager(tiny_model, onnx_file):
    run, data = tiny_model
    images = sorted(str(p) for p in data.rglob("*.jpg"))
    eager = Classifier.load(run, precision="32").predict(images, top_k=3)
    onnx = Classifier.load(onnx_file)
    assert isinstance(onnx.runner, OnnxRunner) and onnx.class_names == ["blue", "green", "red"]
    assert onnx.temperature == pytest.approx(1.5)
    rows = onnx.predict(images, top_k=3)
    assert [r["label"] for r in rows] == [r["label"] for r in eager]
    assert set(rows[0]) == set(eager[0])
    for a, b in zip(rows, eager):
        np.testing.assert_allclose([t["probability"] for t in a["top_k"]], [t["probability"] for t in b["top_k"]],
                                   atol=1e-4)


def test_evaluate_accepts_onnx_classifier(tiny_model, onnx_file):
    from visiontune.evaluation.evaluate import evaluate

    result = evaluate(Classifier.load(onnx_file), tiny_model[1], save=False)
    expected = evaluate(Classifier.load(tiny_model[0], precision="32"), tiny_model[1], save=False)
    assert result["accuracy"] == expected["accuracy"] and result["num_samples"] == 24


def test_corrupted_onnx_gives_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(ExportError, match="not a usable ONNX model"):
        Classifier.load(bad)


def test_mismatched_onnx_sidecar_gives_clear_error(tmp_path, onnx_file):
    (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
    meta = json.loads((onnx_file.parent / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "class_names": ["a", "b", "c"]}))
    with pytest.raises(ExportError, match="disagree on the class names"):
        Classifier.load(tmp_path / "model.onnx")


def test_broken_onnx_sidecar_falls_back_to_the_file_metadata(tmp_path, onnx_file):
    (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
    (tmp_path / "model.json").write_text("{ not json")
    clf = Classifier.load(tmp_path / "model.onnx")  # the ONNX file is authoritative
    assert clf.class_names == ["blue", "green", "red"] and clf.temperature == pytest.approx(1.5)


def test_parity_failure_is_loud():
    with pytest.raises(ExportError, match="agreement"):
        check_parity({"top1_agreement": 0.9, "max_abs_logit_diff": 0.0, "max_rel_logit_diff": 0.0})
    with pytest.raises(ExportError, match="logit diff"):
        check_parity({"top1_agreement": 1.0, "max_abs_logit_diff": 0.1, "max_rel_logit_diff": 0.01})


def test_parity_is_relative_to_the_logits_scale_and_catches_a_real_mismatch():
    """Huge logits (random-init Inception: ~7e7) differ in float32 by far more than 1e-3 in absolute
    terms and still pass; an export that computes something else fails whatever the scale."""
    from visiontune.export.parity import compare_logits, parity_problems

    rng = np.random.default_rng(0)
    for scale in (1.0, 7e7):
        reference = (rng.standard_normal((8, 3)) * scale).astype(np.float32)
        rounding = reference * (1 + rng.uniform(-3e-6, 3e-6, reference.shape)).astype(np.float32)
        assert parity_problems(compare_logits(reference, rounding)) == [], scale
        other = reference.copy()
        other[:, 0] += 0.05 * np.abs(reference).max()  # a wrong bias on one class, 5% of the scale
        problems = parity_problems(compare_logits(reference, other))
        assert any("logit diff" in p for p in problems), scale


def test_cli_export_then_predict_and_evaluate_onnx(tiny_model, tmp_path, capsys):
    """Through the CLI: export, then predict/evaluate the .onnx exactly like the run."""
    run, data = tiny_model
    out = tmp_path / "out dir" / "m.onnx"
    code, stdout, err = vt_main(capsys, "export", run, "--format", "onnx", "--dynamic-batch", "--out", out)
    assert code == 0, err
    assert "top-1 agreement 100.00%" in stdout and out.is_file()
    assert json.loads((out.parent / "export_report.json").read_text())["passed"]
    images = sorted(str(p) for p in data.rglob("*.jpg"))[::3]
    _, from_run, _ = vt_main(capsys, "predict", run, *images, "--precision", "32")
    _, from_onnx, _ = vt_main(capsys, "predict", out, *images)
    rows_run, rows_onnx = (list(csv.DictReader(io.StringIO(t))) for t in (from_run, from_onnx))
    assert list(rows_onnx[0]) == list(rows_run[0])  # identical columns
    assert [r["label"] for r in rows_onnx] == [r["label"] for r in rows_run]
    code, evaluated, _ = vt_main(capsys, "evaluate", out, data, "--json", "--no-save")
    assert code == 0 and json.loads(evaluated)["num_samples"] == 24


def test_static_same_padding_is_exact_and_leaves_no_shape_arithmetic(tiny_model, onnx_file):
    """TF-"SAME" layers get constant pads (int8 broke on the run-time pad arithmetic otherwise)."""
    import onnx
    from timm.layers import AvgPool2dSame, Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    from visiontune.export.static_pad import static_same_padding

    ops = {node.op_type for node in onnx.load(str(onnx_file)).graph.node}
    assert not ops & {"Shape", "Ceil"}, ops  # no pad arithmetic on the run-time input size
    net = torch.nn.Sequential(Conv2dSame(3, 4, 3, stride=2), MaxPool2dSame(3, stride=2),
                              Conv2dSame(4, 4, 4, stride=1), AvgPool2dSame(2, stride=2)).eval()
    for size in (17, 32):
        x = torch.randn(2, 3, size, size)
        fixed = static_same_padding(net, x[:1])
        assert not any(isinstance(m, (Conv2dSame, MaxPool2dSame, AvgPool2dSame)) for m in fixed.modules())
        torch.testing.assert_close(fixed(x), net(x), atol=0, rtol=0)
    assert isinstance(net[0], Conv2dSame)  # the original is untouched


def test_labelled_samples_follow_the_runs_own_split(tiny_model, tmp_path):
    """A run trained with --val-fraction 0.5 is measured on its own 50% val split, not a re-split at 0.2."""
    from visiontune.data.scan import discover
    from visiontune.export.samples import labelled_samples

    data = tiny_model[1]
    splits = discover(data, val_fraction=0.5, seed=3)
    run = tmp_path / "run"
    (run / "splits").mkdir(parents=True)
    for name in ("train", "val"):
        rows = [f"{p},{CLASS_NAMES[y]}" for p, y in getattr(splits, name)]
        (run / "splits" / f"{name}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    from visiontune.models.artifact import read_card

    card = read_card(tiny_model[0] / "model").replace(
        model_dir=run / "model", training={"data": str(data), "seed": 3, "val_fraction": 0.5})
    assert labelled_samples(card) == list(splits.val)
    assert labelled_samples(card, split="train") == list(splits.train)
    assert not {p for p, _ in labelled_samples(card)} & {p for p, _ in labelled_samples(card, split="train")}
    # a model folder in the run folder training recorded re-splits the recorded data with the
    # recorded fraction and seed; moved elsewhere (or from someone else) it names no data: --data
    import os

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "model").mkdir(parents=True)
    recorded = {"data": str(data), "seed": 3, "val_fraction": 0.5, "run_dir": os.path.realpath(elsewhere)}
    own = card.replace(model_dir=elsewhere / "model", training=recorded)
    assert labelled_samples(own) == list(splits.val) and len(labelled_samples(own)) == 12  # half of 8 x 3
    moved = own.replace(model_dir=tmp_path / "moved" / "model")
    assert labelled_samples(moved) == []


# --- multi-label models -----------------------------------------------------------------------------


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
    assert exported.task.name == "multi"
    assert exported.thresholds == pytest.approx(Classifier.load(ml_run.run_dir).thresholds)
    assert [r["labels"] for r in exported.predict(files)] == [r["labels"] for r in eager]
    client = Path(__file__).resolve().parents[1] / "examples" / "onnx_client.py"
    out = subprocess.run([sys.executable, str(client), str(onnx_file), *files, "--label-delim", ";"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("path,labels")
    assert [line.split(",")[1] for line in out[1:]] == [";".join(r["labels"]) for r in eager]
