"""Export (ONNX / TorchScript / timm-HF) parity, the ONNX backend, the standalone client,
int8 quantization and pruning smoke tests, and clear errors for bad ONNX files."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_folder
from visiontune.evaluation.predictor import Classifier
from visiontune.export import EXPORTERS, ExportError, export_model
from visiontune.export.common import check_parity
from visiontune.export.onnx_runtime import OnnxClassifier, load_any
from visiontune.models import build_model, save_model
from vt_support import cli

CLIENT = Path(__file__).resolve().parents[1] / "examples" / "onnx_client.py"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-class efficientnet_lite0 at 64 px saved like a training run (onnxruntime int8
    depthwise kernels reject 1x1 maps at 32 px).

    Instead of training, the head is fitted in closed form (logistic regression on the frozen
    features, a second): real class margins, so int8 agreement is meaningful, not a coin toss.
    """
    from sklearn.linear_model import LogisticRegression

    from visiontune.data.image import load_image
    from visiontune.data.transforms import eval_transform

    base = tmp_path_factory.mktemp("export tiny")
    data = make_folder(base / "data", per_class=8, fmt="jpg")
    model, arch, pre = build_model("efficientnet_lite0", 3)
    pre["input_size"] = [3, 64, 64]
    paths = sorted(data.rglob("*.jpg"))
    x = torch.stack([eval_transform(pre)(load_image(p)) for p in paths])
    labels = [["blue", "green", "red"].index(p.parent.name) for p in paths]
    with torch.no_grad():
        features = model.eval().forward_head(model.forward_features(x), pre_logits=True).numpy()
    fit = LogisticRegression(C=10.0, max_iter=2000).fit(features, labels)
    head = model.get_submodule(arch.head)
    head.weight.data = torch.tensor(fit.coef_, dtype=torch.float32)
    head.bias.data = torch.tensor(fit.intercept_, dtype=torch.float32)
    meta = {"architecture": arch.to_dict(), "class_names": ["blue", "green", "red"], "preprocessing": pre,
            "calibration": {"temperature": 1.5}, "training": {"data": str(data), "seed": 0}}
    save_model(base / "run" / "model", model, meta)
    return base / "run", data


@pytest.fixture(scope="module")
def onnx_file(tiny_model):
    report = export_model(tiny_model[0], "onnx", dynamic_batch=True)
    return Path(report["file"])


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_export_parity_for_every_format(tiny_model, tmp_path, fmt):
    report = export_model(tiny_model[0], fmt, out=tmp_path / fmt / EXPORTERS[fmt][1])
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

    with pytest.raises(ExportError, match="timm architecture"):
        export_hf(torch.nn.Identity(), {"architecture": {"source": "torchvision", "name": "resnet18"}}, tmp_path)


def test_onnx_metadata_and_predict_match_eager(tiny_model, onnx_file):
    run, data = tiny_model
    images = sorted(str(p) for p in data.rglob("*.jpg"))
    eager = Classifier.load(run, precision="32").predict(images, top_k=3)
    onnx = load_any(onnx_file)
    assert isinstance(onnx, OnnxClassifier) and onnx.class_names == ["blue", "green", "red"]
    assert onnx.temperature == pytest.approx(1.5)
    rows = onnx.predict(images, top_k=3)
    assert [r["label"] for r in rows] == [r["label"] for r in eager]
    assert set(rows[0]) == set(eager[0])
    for a, b in zip(rows, eager):
        np.testing.assert_allclose([t["probability"] for t in a["top_k"]], [t["probability"] for t in b["top_k"]],
                                   atol=1e-4)


def test_evaluate_accepts_onnx_classifier(tiny_model, onnx_file):
    from visiontune.evaluation.evaluate import evaluate

    result = evaluate(load_any(onnx_file), tiny_model[1], save=False)
    expected = evaluate(Classifier.load(tiny_model[0], precision="32"), tiny_model[1], save=False)
    assert result["accuracy"] == expected["accuracy"] and result["num_samples"] == 24


def test_standalone_client_matches_predict(tiny_model, onnx_file):
    images = sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[::4]
    out = subprocess.run([sys.executable, str(CLIENT), str(onnx_file), *images], capture_output=True, text=True,
                         check=True).stdout
    client = list(csv.DictReader(io.StringIO(out)))
    eager = Classifier.load(tiny_model[0], precision="32").predict(images, top_k=1)
    assert [r["label"] for r in client] == [r["label"] for r in eager]
    np.testing.assert_allclose([float(r["probability"]) for r in client], [r["probability"] for r in eager], atol=1e-4)
    assert "visiontune" not in CLIENT.read_text().split('"""')[2].replace("visiontune's", "")  # no import


def test_quantize_smoke(tiny_model, tmp_path):
    from visiontune.export.compress import compress

    report = compress(tiny_model[0], quantize="int8", out=tmp_path, budget_s=0.01, force=True, log=lambda _: None)
    names = [r["variant"] for r in report["variants"]]
    assert names == ["eager fp32", "ONNX fp32", "ONNX int8"]
    assert report["variants"][1]["top1_agreement"] == 1.0
    assert report["variants"][2]["top1_agreement"] >= 0.9  # int8 keeps the decisions (static pads)
    assert (tmp_path / "compress_report.json").is_file() and "| variant |" in (tmp_path / "compress_report.md").read_text()
    from visiontune.export.onnx_export import read_metadata

    props = read_metadata(tmp_path / "onnx-int8" / "model.onnx")
    assert props["quantization"] == "int8" and props["int8_scheme"] in ("all", "ends-float")  # chosen, recorded
    quantized = OnnxClassifier.load(tmp_path / "onnx-int8" / "model.onnx")
    assert quantized.predict([str(next(tiny_model[1].rglob("*.jpg")))])[0]["label"] in quantized.class_names


def test_quantize_guard_refuses_large_drop(tiny_model, tmp_path):
    from visiontune.export.compress import compress

    # a negative allowance makes any int8 model "too inaccurate": the guard must refuse it
    with pytest.raises(ExportError, match="max-drop"):
        compress(tiny_model[0], quantize="int8-dynamic", out=tmp_path, max_drop=-101, budget_s=0.01, log=lambda _: None)
    assert json.loads((tmp_path / "compress_report.json").read_text())["refused"]


def test_int8_beyond_max_drop_retries_with_float_ends(tiny_model, tmp_path):
    """Accuracy-aware fallback: a static int8 model over --max-drop is re-quantized with the
    first conv and the classifier in float; both attempts are reported, the better one is kept."""
    from visiontune.export.compress import compress
    from visiontune.export.onnx_export import read_metadata

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
    from visiontune.export.compress import compress

    report = compress(tiny_model[0], prune=0.3, finetune_epochs=1, prune_steps=2, out=tmp_path, budget_s=0.01,
                      log=lambda _: None)
    assert report["pruning"]["macs_after"] < 0.85 * report["pruning"]["macs_before"]
    assert [r["variant"] for r in report["variants"]][-2:] == ["pruned", "pruned ONNX fp32"]
    clf = load_any(tmp_path / "pruned")
    shapes = json.loads((tmp_path / "pruned" / "model.json").read_text())["pruned"]["shapes"]
    # the classifier's input features keep their width (its trained weights stay whole)
    assert shapes["classifier"]["in_features"] == 1280 and shapes["conv_head"]["out_channels"] == 1280
    rows = clf.predict(sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[:3])
    assert all(r["label"] in clf.class_names for r in rows)


def test_corrupted_onnx_gives_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(ExportError, match="not a usable ONNX model"):
        load_any(bad)


def test_mismatched_onnx_sidecar_gives_clear_error(tmp_path, onnx_file):
    (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
    meta = json.loads((onnx_file.parent / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "class_names": ["a", "b", "c"]}))
    with pytest.raises(ExportError, match="disagree on the class names"):
        OnnxClassifier.load(tmp_path / "model.onnx")


def test_broken_onnx_sidecar_falls_back_to_the_file_metadata(tmp_path, onnx_file):
    (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
    (tmp_path / "model.json").write_text("{ not json")
    clf = OnnxClassifier.load(tmp_path / "model.onnx")  # the ONNX file is authoritative
    assert clf.class_names == ["blue", "green", "red"] and clf.temperature == pytest.approx(1.5)


def test_parity_failure_is_loud():
    with pytest.raises(ExportError, match="agreement"):
        check_parity({"top1_agreement": 0.9, "max_abs_logit_diff": 0.0})
    with pytest.raises(ExportError, match="logit diff"):
        check_parity({"top1_agreement": 1.0, "max_abs_logit_diff": 0.1})


def test_cli_export_then_predict_and_evaluate_onnx(tiny_model, tmp_path):
    """End to end through the console: export, then predict/evaluate the .onnx exactly like the run."""
    run, data = tiny_model
    out = tmp_path / "out dir" / "m.onnx"
    done = subprocess.run(cli("export", run, "--format", "onnx", "--dynamic-batch", "--out", out),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "top-1 agreement 100.00%" in done.stdout and out.is_file()
    assert json.loads((out.parent / "export_report.json").read_text())["passed"]
    images = sorted(str(p) for p in data.rglob("*.jpg"))[::3]
    from_run = subprocess.run(cli("predict", run, *images, "--precision", "32"), capture_output=True, text=True,
                              timeout=240, check=True).stdout
    from_onnx = subprocess.run(cli("predict", out, *images), capture_output=True, text=True, timeout=240,
                               check=True).stdout
    rows_run, rows_onnx = (list(csv.DictReader(io.StringIO(t))) for t in (from_run, from_onnx))
    assert list(rows_onnx[0]) == list(rows_run[0])  # identical columns
    assert [r["label"] for r in rows_onnx] == [r["label"] for r in rows_run]
    evaluated = subprocess.run(cli("evaluate", out, data, "--json", "--no-save"), capture_output=True, text=True,
                               timeout=240, check=True).stdout
    assert json.loads(evaluated)["num_samples"] == 24


def test_cli_compress_writes_table_and_exit_codes(tiny_model, tmp_path):
    run = tiny_model[0]
    ok = subprocess.run(cli("compress", run, "--quantize", "int8", "--int8-float-ends", "--out", tmp_path / "c",
                            "--bench-seconds", "0.01", "--max-drop", "100"), capture_output=True, text=True,
                        timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert "ONNX int8" in ok.stdout and (tmp_path / "c" / "compress_report.md").is_file()
    import onnx

    from visiontune.export.onnx_export import read_metadata

    quantized = tmp_path / "c" / "onnx-int8" / "model.onnx"
    assert read_metadata(quantized)["int8_scheme"] == "ends-float"
    nodes = onnx.load(str(quantized)).graph.node
    first_conv = next(n for n in nodes if n.op_type == "Conv")
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in first_conv.input[1:] for n in nodes)
    refused = subprocess.run(cli("compress", run, "--quantize", "int8-dynamic", "--out", tmp_path / "r",
                                 "--bench-seconds", "0.01", "--max-drop", "-101"), capture_output=True, text=True,
                             timeout=240)
    assert refused.returncode == 2 and "max-drop" in refused.stderr and "Traceback" not in refused.stderr
    bad = subprocess.run(cli("compress", run, "--prune", "1.5", "--out", tmp_path / "b"), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "(0, 1)" in bad.stderr
    assert not (tmp_path / "b").exists()  # refused before any export work
    bad_lr = subprocess.run(cli("compress", run, "--prune", "0.3", "--recovery-lr", "-1", "--out", tmp_path / "d"),
                            capture_output=True, text=True, timeout=120)
    assert bad_lr.returncode == 2 and "--recovery-lr must be > 0" in bad_lr.stderr and "Traceback" not in bad_lr.stderr
    assert not (tmp_path / "d").exists()
    bad_epochs = subprocess.run(cli("compress", run, "--prune", "0.3", "--finetune-epochs", "-1", "--out", tmp_path / "e"),
                                capture_output=True, text=True, timeout=120)
    assert bad_epochs.returncode == 2 and "--finetune-epochs must be >= 0" in bad_epochs.stderr
    assert not (tmp_path / "e").exists()
    nothing = subprocess.run(cli("compress", run), capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "--quantize" in nothing.stderr


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
    from visiontune.models import load_model

    model, meta = load_model(tiny_model[0])
    head = model.get_submodule(meta["architecture"]["head"])
    tied = residual_layers(model.float().eval(), torch.zeros(1, 3, 64, 64), [head])
    names = {name for name, module in model.named_modules() if any(module is t for t in tied)}
    assert names and all(name.endswith("conv_pwl") for name in names)  # EfficientNet's projection convs
    assert "blocks.5.0.conv_pwl" in names and "blocks.6.0.conv_pwl" not in names  # last stage has no skip


def test_calibration_sample_is_sized_by_pixels():
    from visiontune.export.quantize import calibration_limit

    size = lambda px: calibration_limit({"preprocessing": {"input_size": [3, px, px]}})  # noqa: E731
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
        rows = [f"{p},{['blue', 'green', 'red'][y]}" for p, y in getattr(splits, name)]
        (run / "splits" / f"{name}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    meta = {"class_names": ["blue", "green", "red"], "model_dir": str(run / "model"),
            "training": {"data": str(data), "seed": 3, "val_fraction": 0.5}}
    assert labelled_samples(meta) == list(splits.val)
    assert labelled_samples(meta, split="train") == list(splits.train)
    assert not {p for p, _ in labelled_samples(meta)} & {p for p, _ in labelled_samples(meta, split="train")}
    # a model folder moved away from its run re-splits with the recorded fraction and seed
    moved = {**meta, "model_dir": str(tmp_path / "elsewhere" / "model")}
    assert labelled_samples(moved) == list(splits.val)
    assert len(labelled_samples(moved)) == 12  # half of 8 images x 3 classes

