"""``--logger mlflow``: the MLflow run (params, epoch metrics, artifacts) and the pyfunc model round trip."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
from conftest import FAST_FLAGS, make_folder, vt_main

from visiontune.cli import main

mlflow = pytest.importorskip("mlflow")  # the test extra installs it; a bare install has no MLflow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One 2-epoch run logged to a local SQLite MLflow store under a path with a space."""
    base = tmp_path_factory.mktemp("ml flow")
    data = make_folder(base / "data", per_class=8)
    uri = f"sqlite:///{base / 'store.db'}"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):  # in this process: no start-up
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
        patch.chdir(base)
        try:
            code = main(["train", str(data), "--epochs", "2", "--freeze-epochs", "1", "--logger", "mlflow",
                         "--run-dir", str(base / "run"), *FAST_FLAGS])
        finally:
            mlflow.set_tracking_uri(None)  # Lightning's logger sets MLflow's process-wide URI: leave none behind
    assert code == 0, out.getvalue()[-3000:]
    return base, data, uri, out.getvalue()


def test_the_run_has_params_epoch_metrics_and_artifacts(tracked):
    base, _, uri, stdout = tracked
    client = mlflow.MlflowClient(uri)
    run_id = json.loads((base / "run" / "logs" / "mlflow.json").read_text())["run_id"]
    assert f"mlflow: run {run_id} logged" in stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    params = run.data.params
    assert params["epochs"] == "2" and params["logger"] == "mlflow" and params["run_dir"] == str(base / "run")
    with open(base / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    history = client.get_metric_history(run_id, "epoch/val_accuracy")
    assert sorted(m.step for m in history) == [int(r["epoch"]) for r in rows] == [1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [float(r["val_accuracy"]) for r in rows]
    card = json.loads((base / "run" / "model" / "model.json").read_text())
    assert run.data.metrics["val/accuracy"] == pytest.approx(card["metrics"]["val"]["accuracy"])
    assert "val_loss" in run.data.metrics  # streamed by Lightning's MLFlowLogger during fit
    artifacts = {a.path for a in client.list_artifacts(run_id, "run")} | {
        a.path for a in client.list_artifacts(run_id, "card")}
    assert {"card/README.md", "card/model.json", "run/curves.png", "run/confusion_matrix.png",
            "run/metrics.csv", "run/config.yaml"} <= artifacts


def test_the_pyfunc_round_trip_predicts_like_visiontune_predict(tracked, capsys, monkeypatch):
    import pandas as pd

    base, data, uri, _ = tracked
    files = sorted(str(p) for p in data.rglob("*.png"))[:5]
    code, out, _ = vt_main(capsys, "predict", base / "run", *files, "--top-k", "2")
    assert code == 0
    expected = list(csv.DictReader(out.splitlines()))
    run_id = json.loads((base / "run" / "logs" / "mlflow.json").read_text())["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where runs:/ URIs resolve
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"allow_paths": True})
    by_bytes = model.predict(pd.DataFrame({"image": [open(f, "rb").read() for f in files]}), params={"top_k": 2})
    by_path = model.predict(pd.DataFrame({"path": files}), params={"top_k": 2})
    assert list(by_path.columns) == list(expected[0].keys())
    assert list(by_path["path"]) == [r["path"] for r in expected]
    for frame in (by_bytes, by_path):
        assert list(frame["label"]) == [r["label"] for r in expected]
        assert list(frame["top2_label"]) == [r["top2_label"] for r in expected]
        np.testing.assert_allclose(frame["probability"], [float(r["probability"]) for r in expected], atol=2e-6)
    broken = model.predict(pd.DataFrame({"image": [b"not an image"]}))
    assert broken["error"][0] and broken["label"][0] == ""
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # as `mlflow models serve` loads it
    refused = served.predict(pd.DataFrame({"path": files[:1]}))
    assert "allow_paths" in refused["error"][0] and refused["label"][0] == ""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mlflow_models_serve_answers_like_predict(tracked, capsys):
    """The real scoring server (`mlflow models serve --env-manager local`) on base64 image bytes."""
    import base64
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    base, data, uri, _ = tracked
    run_id = json.loads((base / "run" / "logs" / "mlflow.json").read_text())["run_id"]
    files = sorted(str(p) for p in data.rglob("*.png"))[:3]
    _, out, _ = vt_main(capsys, "predict", base / "run", *files, "--top-k", "2")
    expected = list(csv.DictReader(out.splitlines()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = str(Path(sys.executable).parent)  # the scoring server execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                               "--env-manager", "local", "-p", str(port)], env=env, cwd=base,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(Path(f).read_bytes()).decode()] for f in files]}, "params": {"top_k": 2}}).encode()
        for _ in range(180):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                 {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())["predictions"]
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(1)
        else:
            raise AssertionError("mlflow models serve did not answer within 180 s")
    finally:
        server.terminate()
        server.wait(30)
    assert [r["label"] for r in answer] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["probability"] for r in answer], [float(r["probability"]) for r in expected],
                               atol=2e-6)


def test_an_unreachable_tracking_store_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://store")
    data = make_folder(tmp_path / "data", per_class=4)
    code, _, err = vt_main(capsys, "train", data, "--epochs", "1", "--logger", "mlflow", "--run-dir", tmp_path / "run",
                           *FAST_FLAGS)
    assert code != 0
    assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()
