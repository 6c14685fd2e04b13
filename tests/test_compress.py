"""``compress``: int8 quantization (static and dynamic) and its accuracy guard, pruning with its
recovery fine-tune, the compress report and table, and the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, vt_main

import visiontune
from visiontune.export.compress import _report, compress
from visiontune.export.onnx_export import read_metadata
from visiontune.export.parity import ValScore
from visiontune.inference.classifier import Classifier
from visiontune.models.card import ModelCard


@pytest.fixture(scope="module")
def int8_forced(tiny_model, tmp_path_factory):
    """One static-int8 compress of tiny_model over any --max-drop (forced): the retry with float
    ends runs, and the better attempt is kept and reported."""
    out = tmp_path_factory.mktemp("int8 forced")
    report = compress(tiny_model[0], quantize="int8", out=out, max_drop=-101, force=True, bench_seconds=0.01,
                      log=lambda _: None)
    return out, report


def test_quantize_smoke(tiny_model, int8_forced):
    out, report = int8_forced
    names = [r["variant"] for r in report["variants"]]
    assert names == ["eager fp32", "ONNX fp32", "ONNX int8"]
    assert report["variants"][1]["top1_agreement"] == 1.0
    assert report["variants"][2]["top1_agreement"] >= 0.9  # int8 keeps the decisions (static pads)
    assert (out / "compress_report.json").is_file()
    assert "| variant |" in (out / "compress_report.md").read_text()
    props = read_metadata(out / "onnx-int8" / "model.onnx")
    assert props["quantization"] == "int8" and props["int8_scheme"] in ("all", "ends-float")  # chosen, recorded
    quantized = Classifier.load(out / "onnx-int8" / "model.onnx")
    assert quantized.predict([str(next(tiny_model[1].rglob("*.jpg")))])[0]["label"] in quantized.class_names


def test_int8_beyond_max_drop_retries_with_float_ends(int8_forced):
    """Accuracy-aware fallback: a static int8 model over --max-drop is re-quantized with the
    first conv and the classifier in float; both attempts are reported, the better one is kept."""
    out, report = int8_forced
    attempts = report["int8_attempts"]
    assert sorted(a["scheme"] for a in attempts) == ["all", "ends-float"]
    assert attempts[-1]["accuracy_change_pts"] >= attempts[0]["accuracy_change_pts"]  # the last one is kept
    assert read_metadata(out / "onnx-int8" / "model.onnx")["int8_scheme"] == attempts[-1]["scheme"]
    assert not (out / "onnx-int8-ends-float").exists()
    assert report["variants"][2]["accuracy_change_pts"] == attempts[-1]["accuracy_change_pts"]
    assert "int8 schemes tried" in report["notes"][0] and report["refused"]


def test_prune_smoke_saves_pickle_free_and_reloads(tiny_model, tmp_path):
    report = compress(tiny_model[0], prune=0.3, finetune_epochs=1, prune_steps=2, out=tmp_path, bench_seconds=0.01,
                      log=lambda _: None)
    assert report["pruning"]["macs_after"] < 0.85 * report["pruning"]["macs_before"]
    assert [r["variant"] for r in report["variants"]][-2:] == ["pruned", "pruned ONNX fp32"]
    clf = Classifier.load(tmp_path / "pruned")
    shapes = json.loads((tmp_path / "pruned" / "model.json").read_text())["pruned"]["shapes"]
    # the classifier's input features keep their width (its trained weights stay whole)
    assert shapes["classifier"]["in_features"] == 1280 and shapes["conv_head"]["out_channels"] == 1280
    rows = clf.predict(sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[:3])
    assert all(r["label"] in clf.class_names for r in rows)


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
    assert json.loads((tmp_path / "r" / "compress_report.json").read_text())["refused"]  # the guard refused it
    for args, needle, folder in ((["--prune", "1.5"], "(0, 1)", "b"),
                                 (["--prune", "0.3", "--recovery-lr", "-1"], "--recovery-lr must be > 0", "d"),
                                 (["--prune", "0.3", "--finetune-epochs", "-1"], "--finetune-epochs must be >= 0", "e"),
                                 ([], "--quantize", "n")):
        code, _, err = vt_main(capsys, "compress", run, *args, "--out", tmp_path / folder)
        assert code == 2 and needle in err and "Traceback" not in err
        assert not (tmp_path / folder).exists()  # refused before any export work


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


# --- the guard and the table, on synthetic rows -----------------------------------------------------


def _rows(int8_speed: float, int8_acc: float) -> list[dict]:
    base = {"size_mb": 10.0, "latency_ms_b1": 1.0, "speedup_vs_eager_b32": 1.0}
    return [{**base, "variant": "eager fp32", "val_accuracy": 1.0, "throughput_b32": 50.0},
            {**base, "variant": "ONNX fp32", "val_accuracy": 1.0, "throughput_b32": 100.0},
            {**base, "variant": "ONNX int8", "val_accuracy": int8_acc, "throughput_b32": int8_speed,
             "size_mb": 2.6}]


def _evidence(changed: int, images: int = 245) -> dict:
    return {"images": images, "decisions": images, "agreeing": images - changed,
            "agreement": (images - changed) / images, "agreement_95ci": [0.9, 1.0]}


@pytest.fixture(scope="module")
def card(tiny_model):
    return ModelCard.from_dict(json.loads((Path(tiny_model[0]) / "model" / "model.json").read_text()))


def test_guard_judges_by_the_decisions_changed_on_every_image(card):
    """One flip in 49 val images (-2.04 pt) no longer refuses a model that changed 1 decision in 245."""
    report = _report("m", card, _rows(300.0, 48 / 49), None, "ONNX int8", 1.0, {}, 49, _evidence(1))
    assert not report["refused"] and any("accepted" in n and "0.41%" in n for n in report["notes"])
    report = _report("m", card, _rows(300.0, 1.0), None, "ONNX int8", 1.0, {}, 49, _evidence(5))
    assert "changed 2.04% of top-1 decisions" in report["refused"]  # val says 0.0 pt: the evidence decides


def test_the_table_says_when_int8_buys_only_size(card):
    slow = _report("m", card, _rows(95.0, 1.0), None, "ONNX int8", 1.0, {}, 49, _evidence(0))
    assert any(n.startswith("int8 buys only size on this CPU: 95.0 img/s vs 100.0 img/s") for n in slow["notes"])
    fast = _report("m", card, _rows(300.0, 1.0), None, "ONNX int8", 1.0, {}, 49, _evidence(0))
    assert not any("buys only size" in n for n in fast["notes"])


# --- multi-label models -----------------------------------------------------------------------------


def _ml_card(thresholds=(0.5, 0.5, 0.5)) -> ModelCard:
    return ModelCard.from_dict({
        "format": "visiontune-model", "class_names": ["a", "b", "c"],
        "architecture": {"source": "timm", "name": "resnet18", "num_classes": 3, "classifier": "fc"},
        "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        "inference": {"task": "multi", "thresholds": list(thresholds)}})


def test_multi_label_guard_is_judged_on_map():
    """mAP is not bounded by decision agreement: a multi-label model's int8 is refused on its val
    mAP drop even when every label decision agreed."""
    card = _ml_card()
    base = {"size_mb": 10.0, "latency_ms_b1": 1.0, "speedup_vs_eager_b32": 1.0}
    rows = [{**base, "variant": "eager fp32", "val_map": 0.9, "throughput_b32": 50.0},
            {**base, "variant": "ONNX fp32", "val_map": 0.9, "throughput_b32": 100.0},
            {**base, "variant": "ONNX int8", "val_map": 0.85, "throughput_b32": 300.0, "size_mb": 2.6}]
    report = _report("m", card, rows, None, "ONNX int8", 1.0, {}, 20, _evidence(0))
    assert rows[2]["map_change_pts"] == pytest.approx(-5.0) and "accuracy_change_pts" not in rows[2]
    assert "macro mAP drop 5.00 pt" in report["refused"]  # all decisions agreed: mAP still decides
    rows[2]["val_map"] = 0.895
    assert not _report("m", card, rows, None, "ONNX int8", 1.0, {}, 20, _evidence(0))["refused"]


def test_val_score_of_a_multi_label_model_is_macro_average_precision():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(30, 3)).astype(np.float32)
    targets = (rng.random((30, 3)) < 0.4).astype(np.float32)
    targets[0] = 1  # every label present
    scorer = ValScore(_ml_card())
    assert (scorer.key, scorer.change) == ("val_map", "map_change_pts")
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    assert scorer.score(logits, targets) == pytest.approx(average_precision_score(targets, probs, average="macro"),
                                                          abs=1e-6)


# slow: the mechanisms are covered fast by test_quantize_smoke, test_int8_beyond_max_drop_retries_with_float_ends
# and test_prune_smoke_saves_pickle_free_and_reloads, the multi-label guard and score by
# test_multi_label_guard_is_judged_on_map and test_val_score_of_a_multi_label_model_is_macro_average_precision,
# and the multi-label graph by test_onnx_export_keeps_label_decisions_and_the_client_agrees (test_export)
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_int8_compress_is_guarded_on_map_and_pruning_keeps_a_multi_label_model(ml_run, ml_data, tmp_path):
    from visiontune.export.compress import compress

    report = compress(ml_run.run_dir, quantize="int8", out=tmp_path / "c", bench_seconds=0.2, force=True,
                      log=lambda m: None)
    eager, onnx, int8 = report["variants"][:3]
    assert "val_map" in eager and "val_accuracy" not in eager
    assert onnx["label_agreement"] >= 0.995 and "map_change_pts" in int8
    assert report["int8_attempts"][-1]["map_change_pts"] == int8["map_change_pts"]
    assert visiontune.load(Path(int8["file"])).task.name == "multi"
    pruned = compress(ml_run.run_dir, prune=0.3, finetune_epochs=1, out=tmp_path / "p", bench_seconds=0.2, force=True,
                      log=lambda m: None)
    row = next(v for v in pruned["variants"] if v["variant"] == "pruned")
    assert row["macs"] < pruned["pruning"]["macs_before"] and 0.0 <= row["val_map"] <= 1.0
    clf = visiontune.load(tmp_path / "p" / "pruned")
    assert clf.task.name == "multi" and clf.thresholds == visiontune.load(ml_run.run_dir).thresholds
    assert set(clf.predict([next((ml_data.parent / "img").glob("*.png"))])[0]["scores"]) == set(CLASSES)
