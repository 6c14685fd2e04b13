"""The standalone examples (no visiontune import): the vendored preprocessing is the package's own,
byte for byte and pixel for pixel; the ONNX client and the Ray bulk predictor give visiontune's
answers."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image

import visiontune
import visiontune.data.preprocess as package_preprocess
from visiontune.data.image import load_image
from visiontune.data.preprocess import RESIZE_MODES, Preprocessing
from visiontune.data.transforms import eval_transform
from visiontune.inference.classifier import Classifier

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VENDORED = EXAMPLES / "visiontune_preprocess.py"
CLIENT = EXAMPLES / "onnx_client.py"
RAY_SCRIPT = EXAMPLES / "ray_predict.py"


def _vendored():
    spec = importlib.util.spec_from_file_location("visiontune_preprocess_under_test", VENDORED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_vendored_preprocessing_is_the_packages_file():
    assert VENDORED.read_bytes() == Path(package_preprocess.__file__).read_bytes(), (
        "examples/visiontune_preprocess.py differs from src/visiontune/data/preprocess.py; "
        "copy the package's file over it")
    for path in (VENDORED, CLIENT, RAY_SCRIPT):
        code = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not any("visiontune" in line and "visiontune_preprocess" not in line for line in code), path


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size,crop_pct,interpolation", [((3, 64, 64), 0.875, "bicubic"),
                                                         ((3, 48, 80), 1.0, "bilinear")])
def test_vendored_pixels_equal_the_package_transform(tmp_path, mode, size, crop_pct, interpolation):
    vendored = _vendored()
    values = {"input_size": list(size), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "crop_pct": crop_pct, "interpolation": interpolation, "resize_mode": mode}
    rng = np.random.default_rng(0)
    for shape in ((97, 131), (200, 60)):
        path = tmp_path / f"img-{shape[0]}.jpg"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path, quality=90)
        theirs = vendored.load(str(path), vendored.Preprocessing.from_dict(values))
        spec = Preprocessing.from_dict(values)
        ours = eval_transform(spec)(load_image(path, spec.draft_size())).numpy()
        assert theirs.shape == (3, size[1], size[2]) and theirs.dtype == np.float32
        assert np.array_equal(theirs, ours)  # bit-identical, not merely close


def test_standalone_client_matches_predict(tiny_model, onnx_file):
    images = sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[::4]
    out = subprocess.run([sys.executable, str(CLIENT), str(onnx_file), *images], capture_output=True, text=True,
                         check=True).stdout
    client = list(csv.DictReader(io.StringIO(out)))
    eager = Classifier.load(tiny_model[0], precision="32").predict(images, top_k=1)
    assert [r["label"] for r in client] == [r["label"] for r in eager]
    np.testing.assert_allclose([float(r["probability"]) for r in client], [r["probability"] for r in eager], atol=1e-4)


@pytest.mark.timeout(300)
def test_ray_predict_matches_onnx_backend(tiny_model, onnx_file, tmp_path):
    import ray.data  # noqa: F401  (a test dependency: fail loudly when missing)

    data = tiny_model[1]
    readable = sorted(str(p) for p in data.rglob("*.jpg"))[::-1]  # not sorted: the output must keep this order
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image, just text")
    inputs = readable[:5] + [str(broken)] + readable[5:]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(inputs) + "\n")
    out = tmp_path / "ray out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(RAY_SCRIPT), str(onnx_file), str(listing), "--out", str(out),
                           "--num-cpus", "2", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == inputs
    bad = rows.pop(5)
    assert bad["error"] and not bad["label"] and not bad["probability"]
    expected = Classifier.load(onnx_file).predict(readable, top_k=1)
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert not any(r["error"] for r in rows)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], [e["probability"] for e in expected],
                               atol=1e-4)


def test_uint8_input_graph_normalises_inside_and_every_client_agrees(tiny_model, tmp_path, capsys):
    """export --input-dtype uint8: parity-checked like the float graph; visiontune itself, the standalone
    client (which sends only resized pixels) and eager PyTorch give the same answers."""
    import onnxruntime as ort
    from conftest import vt_main

    out = tmp_path / "uint8" / "model.onnx"
    code, stdout, err = vt_main(capsys, "export", tiny_model[0], "--input-dtype", "uint8", "--dynamic-batch",
                                "--out", out)
    assert code == 0, err
    report = json.loads((out.parent / "export_report.json").read_text())
    assert report["passed"] and report["top1_agreement"] == 1.0 and report["max_rel_logit_diff"] < 1e-5
    graph_input = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert graph_input.type == "tensor(uint8)" and graph_input.shape[1:] == [64, 64, 3]
    assert "uint8 NHWC" in json.loads((out.parent / "model.json").read_text())["export"]["input"]
    images = sorted(str(p) for p in tiny_model[1].rglob("*.jpg"))[::4]
    eager = Classifier.load(tiny_model[0], precision="32").predict(images, top_k=1)
    loaded = Classifier.load(out).predict(images, top_k=1)  # predict/evaluate/serve take the file as it is
    client = list(csv.DictReader(io.StringIO(subprocess.run([sys.executable, str(CLIENT), str(out), *images],
                                                            capture_output=True, text=True, check=True).stdout)))
    for rows in (loaded, client):
        assert [r["label"] for r in rows] == [r["label"] for r in eager]
        np.testing.assert_allclose([float(r["probability"]) for r in rows], [r["probability"] for r in eager],
                                   atol=1e-4)
    code, _, err = vt_main(capsys, "export", tiny_model[0], "--format", "torchscript", "--input-dtype", "uint8",
                           "--out", tmp_path / "ts" / "model.pt")
    assert code == 2 and "--format onnx" in err and "Traceback" not in err


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
