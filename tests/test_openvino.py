"""OpenVINO: export, loading like an .onnx (predict/evaluate/serve), NNCF int8 in compress (the guard
itself: test_compress.py)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import vt_main

pytest.importorskip("openvino")  # the test extra installs it

from visiontune.core.errors import ExportError  # noqa: E402
from visiontune.export.compress import compress  # noqa: E402
from visiontune.export.exporter import export_model  # noqa: E402
from visiontune.inference.classifier import Classifier  # noqa: E402
from visiontune.inference.runners import OpenVinoRunner  # noqa: E402


@pytest.fixture()
def ov_folder(openvino_folder):
    return openvino_folder  # shared with test_untrusted_graphs: read-only here


def test_the_xml_describes_itself_and_predicts_like_eager_and_onnx(tiny_model, ov_folder, onnx_file, capsys,
                                                                    tmp_path):
    import shutil

    assert {p.name for p in ov_folder.iterdir()} >= {"model.xml", "model.bin", "model.json", "export_report.json"}
    run, data = tiny_model
    alone = shutil.copytree(ov_folder, tmp_path / "ov", ignore=shutil.ignore_patterns("model.json"))
    runner, card = OpenVinoRunner.load(alone / "model.xml")  # the .xml's rt_info alone is enough
    eager = Classifier.load(run, precision="32")
    assert card.class_names == eager.class_names and card.temperature == eager.temperature
    assert card.preprocessing.to_dict() == eager.card.preprocessing.to_dict()
    images = sorted(str(p) for p in data.rglob("*.jpg"))[::3]
    rows = {}
    for name, model in (("run", run), ("onnx", onnx_file), ("openvino", ov_folder)):
        code, out, err = vt_main(capsys, "predict", model, *images, "--precision", "32", "--top-k", "3")
        assert code == 0, err
        rows[name] = list(csv.DictReader(io.StringIO(out)))
    assert [r["label"] for r in rows["openvino"]] == [r["label"] for r in rows["run"]]
    np.testing.assert_allclose([float(r["probability"]) for r in rows["openvino"]],
                               [float(r["probability"]) for r in rows["onnx"]], atol=1e-5)
    code, out, _ = vt_main(capsys, "evaluate", ov_folder / "model.xml", data, "--json", "--no-save")
    assert code == 0 and json.loads(out)["num_samples"] == 24


def test_serve_accepts_an_openvino_folder(ov_folder, tiny_model):
    from fastapi.testclient import TestClient

    from visiontune.serve.app import create_app
    from visiontune.serve.settings import ServeSettings

    image = next(tiny_model[1].rglob("*.jpg"))
    with TestClient(create_app(ov_folder, ServeSettings(warmup=False)), base_url="http://127.0.0.1") as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            import time

            time.sleep(0.05)
        answer = client.post("/v1/predict", files={"file": ("x.jpg", image.read_bytes(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    expected = Classifier.load(tiny_model[0], precision="32").predict([str(image)])[0]
    assert answer.json()["predictions"][0]["label"] == expected["label"]


def test_uint8_input_openvino_graph_matches_the_float_one(tiny_model, tmp_path):
    report = export_model(tiny_model[0], "openvino", out=tmp_path / "u8" / "model.xml", input_dtype="uint8")
    assert report["passed"] and report["top1_agreement"] == 1.0
    files = sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[:4]
    pixels = Classifier.load(tmp_path / "u8").predict(files)
    eager = Classifier.load(tiny_model[0], precision="32").predict(files)
    assert [r["label"] for r in pixels] == [r["label"] for r in eager]


def test_foreign_or_tampered_openvino_models_get_clear_errors(ov_folder, tmp_path):
    import openvino as ov

    model = ov.Core().read_model(str(ov_folder / "model.xml"))
    del model.get_rt_info()["visiontune"]  # a model OpenVINO accepts but visiontune did not describe
    bare = ov.Model(model.outputs, model.get_parameters(), "bare")
    ov.save_model(bare, str(tmp_path / "bare" / "model.xml"))
    with pytest.raises(ExportError, match="no visiontune metadata"):
        Classifier.load(tmp_path / "bare")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.xml").write_text("<net>not really</net>")
    with pytest.raises(ExportError, match="not a usable OpenVINO model"):
        Classifier.load(tmp_path / "junk")


def test_compress_openvino_int8_rows_and_the_guard_evidence(tiny_model, tmp_path):
    report = compress(tiny_model[0], quantize="int8", int8_backend="openvino", out=tmp_path, bench_seconds=0.01,
                      force=True, log=lambda _: None)
    names = [r["variant"] for r in report["variants"]]
    assert names == ["eager fp32", "ONNX fp32", "OpenVINO fp32", "OpenVINO int8"]
    assert report["variants"][2]["top1_agreement"] == 1.0
    evidence = report["int8_agreement"]
    assert evidence["images"] == 24  # every image at hand: training and validation splits
    low, high = evidence["agreement_95ci"]
    assert low <= evidence["agreement"] <= high
    assert Classifier.load(tmp_path / "openvino-int8").predict([str(next(tiny_model[1].rglob("*.jpg")))])[0]["label"]
    assert json.loads((tmp_path / "openvino-int8" / "model.json").read_text())["export"]["quantization"] == "int8"
    with pytest.raises(ExportError, match="int8-dynamic"):
        compress(tiny_model[0], quantize="int8-dynamic", int8_backend="openvino", out=tmp_path / "x",
                 log=lambda _: None)


def test_compiling_leaves_the_threads_signal_stack_as_it_was(ov_folder):
    """OpenVINO installs its own alternate signal stack on the compiling thread and restores the one
    it found when the model is freed; freed out of order, the thread pointed at freed memory and the
    next SIGCHLD killed the process (seen as a SIGSEGV in the test run). It must stay ours."""
    import ctypes
    import gc

    from visiontune.inference.runners import _StackT, openvino_compile

    libc = ctypes.CDLL(None, use_errno=True)

    def current():
        stack = _StackT()
        assert libc.sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp, stack.ss_flags, stack.ss_size

    before = current()
    first, _ = openvino_compile(ov_folder / "model.xml")
    second, _ = openvino_compile(ov_folder / "model.xml")
    assert current() == before
    del first  # out of order: the first compiled is freed first
    gc.collect()
    del second
    gc.collect()
    assert current() == before
