"""--backend auto: the fastest verified CPU runtime, measured once per model, cached outside the model folder."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import refuse_to_measure, vt_main

from visiontune.export import runtime
from visiontune.export.runtime import load_classifier, prepare_runtime
from visiontune.inference.accelerated import GRAPH_FILES, runtime_dir
from visiontune.inference.classifier import Classifier
from visiontune.inference.runners import OnnxRunner, OpenVinoRunner, TorchRunner


def _files(tiny_model, n=6):
    return sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[:n]


def _probabilities(clf, files):
    rows = clf.predict(files, top_k=3)
    return [r["label"] for r in rows], np.array([[t["probability"] for t in r["top_k"]] for r in rows])


def test_the_choice_is_measured_once_verified_and_cached_outside_the_model(tiny_model, measured_runtime,
                                                                           measured_cache):
    model_dir = tiny_model[0] / "model"
    _, choice, lines = measured_runtime  # measured once for the session, in a cache of its own
    assert choice["backend"] in ("eager", *choice["verified"]) and set(choice["verified"]) <= set(GRAPH_FILES)
    assert "onnxruntime" in choice["verified"]  # the parity check passed: fp32 graphs match eager
    assert set(choice["images_per_s_b32"]) == {"eager", *choice["verified"]}
    folder = runtime_dir(model_dir)
    assert json.loads((folder / "choice.json").read_text())["backend"] == choice["backend"]
    assert not {p.name for p in model_dir.iterdir()} & {"choice.json", *GRAPH_FILES.values()}  # nothing written
    assert lines and lines[-1].startswith(f"runtime: {choice['backend']}")
    again = []
    assert prepare_runtime(tiny_model[0], log=again.append) == choice and "measured before" in again[0]


@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "openvino"])
def test_every_backend_predicts_like_eager_fp32(tiny_model, measured_cache, backend):
    files = _files(tiny_model)
    clf = load_classifier(tiny_model[0], backend=backend, log=lambda _: None)
    chosen = prepare_runtime(tiny_model[0], log=lambda _: None)
    expected_type = {"eager": TorchRunner, "onnxruntime": OnnxRunner, "openvino": OpenVinoRunner}[
        chosen["backend"] if backend == "auto" else backend]
    assert type(clf.runner) is expected_type
    labels, probs = _probabilities(clf, files)
    eager_labels, eager_probs = _probabilities(Classifier.load(tiny_model[0], precision="32"), files)
    assert labels == eager_labels
    if backend != "auto" or chosen["backend"] != "eager":  # eager "auto" may run bf16 where it pays
        np.testing.assert_allclose(probs, eager_probs, atol=1e-4)


def test_a_damaged_cache_means_eager_then_a_new_measurement(tiny_model, measured_cache, monkeypatch):
    folder = runtime_dir(tiny_model[0] / "model")
    graph = folder / GRAPH_FILES["onnxruntime"]
    saved = graph.read_bytes()
    graph.write_bytes(b"not onnx")
    try:
        clf = Classifier.load(tiny_model[0], backend="onnxruntime")
        assert type(clf.runner) is TorchRunner  # never a failed command
    finally:
        graph.write_bytes(saved)
    (folder / "choice.json").write_text("{broken")
    lines = []
    refuse_to_measure(monkeypatch)  # what matters is that a new measurement starts and is recorded
    choice = prepare_runtime(tiny_model[0], log=lines.append)
    assert "measuring" in lines[0] and json.loads((folder / "choice.json").read_text()) == choice


def test_an_export_failure_is_recorded_as_eager_with_its_reason(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise RuntimeError("exporter says no")

    monkeypatch.setattr(runtime, "export_onnx", refuse)
    lines = []
    choice = prepare_runtime(tiny_model[0], log=lines.append)
    assert choice["backend"] == "eager" and "exporter says no" in choice["reason"]
    assert "eager because RuntimeError: exporter says no" in lines[-1]
    assert type(load_classifier(tiny_model[0], log=lambda _: None).runner) is TorchRunner


def test_cli_predict_and_evaluate_take_backend(tiny_model, measured_cache, capsys, monkeypatch):
    run, data = tiny_model
    files = _files(tiny_model)
    outputs = {}
    for backend in ("eager", "auto", "openvino"):
        code, out, err = vt_main(capsys, "predict", run, *files, "--backend", backend, "--precision", "32")
        assert code == 0, err
        outputs[backend] = [r["label"] for r in csv.DictReader(io.StringIO(out))]
        assert ("runtime:" in err) == (backend != "eager")
    assert outputs["auto"] == outputs["eager"] == outputs["openvino"]
    monkeypatch.delenv("VISIONTUNE_BACKEND")  # what a user gets without the flag: auto
    code, out, err = vt_main(capsys, "predict", run, *files, "--precision", "32")
    assert code == 0 and "runtime:" in err and [r["label"] for r in csv.DictReader(io.StringIO(out))] == outputs["auto"]
    code, out, _ = vt_main(capsys, "evaluate", run, data, "--json", "--no-save", "--backend", "onnxruntime")
    assert code == 0 and json.loads(out)["num_samples"] == 24
    code, _, err = vt_main(capsys, "predict", run, *files, "--backend", "tensorrt")
    assert code == 2 and "invalid choice" in err


def test_an_unwritable_cache_runs_eager_with_a_clear_line(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "not a folder"
    blocker.write_text("x")
    monkeypatch.setenv("VISIONTUNE_CACHE", str(blocker))  # runtimes/ cannot be created under a file
    lines = []
    clf = load_classifier(tiny_model[0], log=lines.append)
    assert type(clf.runner) is TorchRunner and "VISIONTUNE_CACHE" in lines[-1]
