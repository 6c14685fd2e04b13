"""examples/ray_predict.py (Ray Data map_batches over an ONNX export) in Ray's local mode: one row
per input in input order, the same labels/probabilities as visiontune's ONNX backend, and an
error row (not a failed job) for an unreadable file."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder

import ray.data  # noqa: F401  (a test dependency: fail loudly when missing)

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ray_predict.py"


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-class efficientnet_lite0 at 64 px (pretrained features, fresh head) exported with a dynamic batch."""
    from visiontune.export import export_model
    from visiontune.models import build_model, save_model

    base = tmp_path_factory.mktemp("ray example")
    data = make_folder(base / "my data", per_class=4, fmt="jpg")
    model, arch, pre = build_model("efficientnet_lite0", 3)
    pre["input_size"] = [3, 64, 64]
    meta = {"architecture": arch.to_dict(), "class_names": ["blue", "green", "red"], "preprocessing": pre,
            "calibration": {"temperature": 1.5}, "training": {"data": str(data), "seed": 0}}
    save_model(base / "run" / "model", model, meta)
    return Path(export_model(base / "run", "onnx", dynamic_batch=True)["file"]), data


@pytest.mark.timeout(300)
def test_ray_predict_matches_onnx_backend(onnx_export, tmp_path):
    from visiontune.export.onnx_runtime import load_any

    onnx_path, data = onnx_export
    readable = sorted(str(p) for p in data.rglob("*.jpg"))[::-1]  # not sorted: the output must keep this order
    broken = data / "broken.jpg"
    broken.write_text("not an image, just text")
    inputs = readable[:5] + [str(broken)] + readable[5:]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(inputs) + "\n")
    out = tmp_path / "ray out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(onnx_path), str(listing), "--out", str(out),
                           "--num-cpus", "2", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == inputs
    bad = rows.pop(5)
    assert bad["error"] and not bad["label"] and not bad["probability"]
    expected = load_any(onnx_path).predict(readable, top_k=1)
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert not any(r["error"] for r in rows)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], [e["probability"] for e in expected],
                               atol=1e-4)
    assert "import visiontune" not in SCRIPT.read_text()  # the workers need no visiontune install
