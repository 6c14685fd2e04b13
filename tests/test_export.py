"""Export (ONNX / TorchScript / timm-HF) parity, the ONNX backend, int8 quantization and pruning,
the CLI export/compress commands, and clear errors for bad ONNX files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, vt_main

from visiontune.core.errors import ExportError
from visiontune.export.common import check_parity
from visiontune.export.compress import compress
from visiontune.export.exporter import export_model
from visiontune.export.onnx_export import read_metadata
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


def test_quantize_smoke(tiny_model, tmp_path):
    report = compress(tiny_model[0], quantize="int8", out=tmp_path, budget_s=0.01, force=True, log=lambda _: None)
    names = [r["variant"] for r in report["variants"]]
    assert names == ["eager fp32", "ONNX fp32", "ONNX int8"]
    assert report["variants"][1]["top1_agreement"] == 1.0
    assert report["variants"][2]["top1_agreement"] >= 0.9  # int8 keeps the decisions (static pads)
    assert (tmp_path / "compress_report.json").is_file()
    assert "| variant |" in (tmp_path / "compress_report.md").read_text()
    props = read_metadata(tmp_path / "onnx-int8" / "model.onnx")
    assert props["quantization"] == "int8" and props["int8_scheme"] in ("all", "ends-float")  # chosen, recorded
    quantized = Classifier.load(tmp_path / "onnx-int8" / "model.onnx")
    assert quantized.predict([str(next(tiny_model[1].rglob("*.jpg")))])[0]["label"] in quantized.class_names


def test_quantize_guard_refuses_large_drop(tiny_model, tmp_path):
    # a negative allowance makes any int8 model "too inaccurate": the guard must refuse it
    with pytest.raises(ExportError, match="max-drop"):
        compress(tiny_model[0], quantize="int8-dynamic", out=tmp_path, max_drop=-101, budget_s=0.01, log=lambda _: None)
    assert json.loads((tmp_path / "compress_report.json").read_text())["refused"]


def test_int8_beyond_max_drop_retries_with_float_ends(tiny_model, tmp_path):
    """Accuracy-aware fallback: a static int8 model over --max-drop is re-quantized with the
    first conv and the classifier in float; both attempts are reported, the better one is kept."""
    from visiontune.export.compress import compress
    report = compress(tiny_model[0], quantize="int8", out=tmp_path, max_drop=-101, force=True, budget_s=0.01,
                      log=lambda _: None)
    attempts = report["int8_attempts"]
    assert sorted(a["scheme"] for a in attempts) == ["all", "ends-float"]
    assert attempts[-1]["accuracy_change_pts"] >= attempts[0]["accuracy_change_pts"]  # the last one is kept
    assert read_metadata(tmp_path / "onnx-int8" / "model.onnx")["int8_scheme"] == attempts[-1]["scheme"]
    assert not (tmp_path / "onnx-int8-ends-float").exists()
    assert report["variants"][2]["accuracy_change_pts"] == attempts[-1]["accuracy_change_pts"]
    assert "int8 schemes tried" in report["notes"][0] and report["refused"]


def test_prune_smoke_saves_pickle_free_and_reloads(tiny_model, tmp_path):
    report = compress(tiny_model[0], prune=0.3, finetune_epochs=1, prune_steps=2, out=tmp_path, budget_s=0.01,
                      log=lambda _: None)
    assert report["pruning"]["macs_after"] < 0.85 * report["pruning"]["macs_before"]
    assert [r["variant"] for r in report["variants"]][-2:] == ["pruned", "pruned ONNX fp32"]
    clf = Classifier.load(tmp_path / "pruned")
    shapes = json.loads((tmp_path / "pruned" / "model.json").read_text())["pruned"]["shapes"]
    # the classifier's input features keep their width (its trained weights stay whole)
    assert shapes["classifier"]["in_features"] == 1280 and shapes["conv_head"]["out_channels"] == 1280
    rows = clf.predict(sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[:3])
    assert all(r["label"] in clf.class_names for r in rows)


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
    from visiontune.export.common import compare_logits, parity_problems

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


def test_cli_compress_writes_table_and_exit_codes(tiny_model, tmp_path, capsys):
    import onnx

    run = tiny_model[0]
    code, out, err = vt_main(capsys, "compress", run, "--quantize", "int8", "--int8-float-ends", "--out",
                             tmp_path / "c", "--bench-seconds", "0.01", "--max-drop", "100")
    assert code == 0, err
    assert "ONNX int8" in out and (tmp_path / "c" / "compress_report.md").is_file()
    quantized = tmp_path / "c" / "onnx-int8" / "model.onnx"
    assert read_metadata(quantized)["int8_scheme"] == "ends-float"
    nodes = onnx.load(str(quantized)).graph.node
    first_conv = next(n for n in nodes if n.op_type == "Conv")
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in first_conv.input[1:] for n in nodes)
    code, _, err = vt_main(capsys, "compress", run, "--quantize", "int8-dynamic", "--out", tmp_path / "r",
                           "--bench-seconds", "0.01", "--max-drop", "-101")
    assert code == 2 and "max-drop" in err and "Traceback" not in err
    for args, needle, folder in ((["--prune", "1.5"], "(0, 1)", "b"),
                                 (["--prune", "0.3", "--recovery-lr", "-1"], "--recovery-lr must be > 0", "d"),
                                 (["--prune", "0.3", "--finetune-epochs", "-1"], "--finetune-epochs must be >= 0", "e"),
                                 ([], "--quantize", "n")):
        code, _, err = vt_main(capsys, "compress", run, *args, "--out", tmp_path / folder)
        assert code == 2 and needle in err and "Traceback" not in err
        assert not (tmp_path / folder).exists()  # refused before any export work


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


def test_residual_streams_are_left_whole(tiny_model):
    """Channels shared by residual additions are not pruned (measured: they cost the most accuracy)."""
    from visiontune.export.prune import residual_layers
    from visiontune.models.artifact import load_model

    model, card = load_model(tiny_model[0])
    head = model.get_submodule(card.architecture.classifier)
    tied = residual_layers(model.float().eval(), torch.zeros(1, 3, 64, 64), [head])
    names = {name for name, module in model.named_modules() if any(module is t for t in tied)}
    assert names and all(name.endswith("conv_pwl") for name in names)  # EfficientNet's projection convs
    assert "blocks.5.0.conv_pwl" in names and "blocks.6.0.conv_pwl" not in names  # last stage has no skip


def test_calibration_sample_is_sized_by_pixels(tiny_model):
    from visiontune.export.quantize import calibration_limit
    from visiontune.models.artifact import read_card

    card = read_card(tiny_model[0] / "model")

    def size(px):
        return calibration_limit(card.replace(preprocessing=card.preprocessing.with_size(px)))

    assert size(224) == 128 and size(64) == 512 and size(448) == 64  # memory ~ images x pixels


def test_labelled_samples_follow_the_runs_own_split(tiny_model, tmp_path):
    """A run trained with --val-fraction 0.5 is measured on its own 50% val split, not a re-split at 0.2."""
    from visiontune.data.scan import discover
    from visiontune.export.common import labelled_samples

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

