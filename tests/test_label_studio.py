"""Label Studio's JSON: an export read as training data (single- and multi-label, local-files and
plain paths, unannotated and cancelled tasks skipped), malformed exports refused with the remedy,
``predict --label-studio`` tasks that read back as the same labels, and (slow) the round trip
through a real Label Studio server: tasks imported and annotated through label-studio-sdk, the
project's export trained on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FAST_FLAGS, vt_main

import visiontune
from visiontune.core.errors import DataError
from visiontune.data.label_studio import as_csv, label_config, prediction_tasks, tasks_to_rows
from visiontune.data.scan import discover


def annotated(image: str, *choices: str, cancelled: bool = False) -> dict:
    return {"data": {"image": image}, "annotations": [{"was_cancelled": cancelled, "result": [
        {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": list(choices)}}]}]}


def export_of(folder: Path, root: Path) -> list[dict]:
    """Every image of ``folder`` as a task: half as local files under ``root``, half as absolute paths."""
    tasks = []
    for i, path in enumerate(sorted(folder.rglob("*.png"))):
        ref = "/data/local-files/?d=" + path.relative_to(root).as_posix() if i % 2 else str(path)
        tasks.append(annotated(ref, path.parent.name))
    return tasks


def test_an_export_trains_like_its_folder(shared_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(shared_folder.parent))
    tasks = export_of(shared_folder, shared_folder.parent)
    first = tasks[0]["data"]["image"]
    tasks += [{"data": {"image": first}, "annotations": []},  # not annotated yet
              annotated(first, "blue", cancelled=True)]       # skipped by its annotator
    export = tmp_path / "project export.json"
    export.write_text(json.dumps(tasks))
    splits = discover(export, scan=False)
    assert splits.class_names == sorted({p.parent.name for p in shared_folder.rglob("*.png")})
    assert len(splits.train) + len(splits.val) == len(list(shared_folder.rglob("*.png")))
    code, out, err = vt_main(capsys, "train", export, "--epochs", "1", "--freeze-epochs", "0", "--strategy",
                             "finetune", "--run-dir", tmp_path / "run", *FAST_FLAGS, "--no-report", "--no-unknown")
    assert code == 0, err
    assert "2 without an annotation skipped" in out
    assert as_csv(export) == as_csv(export)  # one CSV per export's content


def test_a_multiple_choice_export_is_multi_label(shared_folder, tmp_path):
    paths = sorted(shared_folder.rglob("*.png"))
    tasks = [annotated(str(p), *(["cat", "dog"] if i % 3 == 0 else ["cat"] if i % 3 == 1 else ["dog"]))
             for i, p in enumerate(paths)]
    export = tmp_path / "ml.json"
    export.write_text(json.dumps(tasks))
    splits = discover(export, scan=False)
    assert splits.task.name == "multi" and splits.class_names == ["cat", "dog"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON file"),
    ('{"tasks": []}', "is a list of tasks"),
    ('[1]', "is not an object"),
    ('[{"annotations": []}]', "without its 'data' object"),
    ('[{"data": {"image": "https://example.com/a.jpg"}, "annotations": [{"result": [{"value": {"choices": ["a"]}}]}]}]',
     "is a URL"),
    ('[{"data": {"image": "/data/upload/3/x.jpg"}, "annotations": [{"result": [{"value": {"choices": ["a"]}}]}]}]',
     "LABEL_STUDIO_BASE_DATA_DIR"),
    ('[{"data": {"image": "a.jpg"}, "annotations": [{"result": [{"value": {"choices": "a"}}]}]}]', "not a list"),
    ('[{"data": {"image": "a.jpg"}, "annotations": []}]', "has an annotation with choices"),
])
def test_malformed_exports_are_refused_with_the_remedy_and_nothing_written(content, message, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_BASE_DATA_DIR", raising=False)
    export = tmp_path / "export.json"
    export.write_text(content)
    code, _, err = vt_main(capsys, "train", export, "--run-dir", tmp_path / "run", *FAST_FLAGS)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_uploaded_images_resolve_under_the_data_dir(tmp_path):
    rows, skipped = tasks_to_rows([annotated("/data/upload/3/ab12-cat.jpg", "cat")], tmp_path, "e.json",
                                  env={"LABEL_STUDIO_BASE_DATA_DIR": "/srv/ls"})
    assert rows == [("/srv/ls/media/upload/3/ab12-cat.jpg", ["cat"])] and skipped == 0


def test_predict_writes_tasks_that_read_back_as_its_answers(trained_run, tmp_path, capsys):
    run, data = trained_run
    out = tmp_path / "for label studio" / "tasks.json"
    out.parent.mkdir()
    code, _, err = vt_main(capsys, "predict", run.run_dir, data, "--out", out, "--label-studio", data, "--workers", "0")
    assert code == 0, err
    tasks = json.loads(out.read_text())
    rows = visiontune.predict(run.run_dir, [str(data)], workers=0).rows
    assert len(tasks) == len(rows) and all(t["data"]["image"].startswith("/data/local-files/?d=") for t in tasks)
    answered = [r for r in rows if not r.get("unknown")]
    assert sum("predictions" in t for t in tasks) == len(answered)
    # the predictions, taken as annotations, read back as the same images and labels
    as_export = [{"data": t["data"], "annotations": [{"result": t["predictions"][0]["result"]}]}
                 for t in tasks if "predictions" in t]
    back, _ = tasks_to_rows(as_export, Path("."), "tasks.json", env={"LOCAL_FILES_DOCUMENT_ROOT": str(data)})
    assert sorted((str(Path(p).resolve()), labels[0]) for p, labels in back) == sorted(
        (str(Path(r["path"]).resolve()), r["label"]) for r in answered)
    scores = {str(Path(r["path"]).resolve()): r["probability"] for r in answered}
    assert all(abs(t["predictions"][0]["score"] - scores[str((data / t["data"]["image"].split("=", 1)[1]).resolve())])
               < 1e-5 for t in tasks if "predictions" in t)
    config = out.with_suffix(".xml").read_text()
    assert 'choice="single"' in config and all(f'<Choice value="{n}"/>' in config for n in run.load().class_names)
    code, _, err = vt_main(capsys, "predict", run.run_dir, data, "--label-studio", data)
    assert code == 2 and "--out FILE.json" in err


def test_multi_label_predictions_and_config(tmp_path):
    rows = [{"path": "/d/a.jpg", "labels": ["cat", "dog"], "scores": {"cat": 0.9, "dog": 0.7}, "error": None},
            {"path": "/d/b.jpg", "labels": [], "scores": {"cat": 0.1, "dog": 0.2}, "error": None},
            {"path": "/e/c.jpg", "labels": [], "scores": {}, "error": "not an image"}]
    tasks = prediction_tasks(rows, Path("/d"), "visiontune test")
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=a.jpg", "/data/local-files/?d=b.jpg",
                                                   "/e/c.jpg"]
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(0.7)
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["cat", "dog"]
    assert "predictions" not in tasks[1] and "predictions" not in tasks[2]
    assert 'choice="multiple"' in label_config(["a&b", 'say "x"'], multiple=True)
    assert "a&amp;b" in label_config(["a&b"], multiple=False)
    with pytest.raises(DataError):
        tasks_to_rows([{"data": {"image": "x.jpg"}, "annotations": "no"}], tmp_path, "e.json", env={})


# ---------------------------------------------------------------------------- a real server (slow)
ROOT = Path(__file__).resolve().parent.parent
LABEL_STUDIO_VENV = Path(os.environ.get("VISIONTUNE_LABEL_STUDIO_VENV", ROOT / ".venv-ls"))


@pytest.fixture
def label_studio(tmp_path):
    """A Label Studio server (its own environment, ``make label-studio``; SQLite in ``tmp_path``) on
    loopback, serving ``tmp_path / "ls root"`` as local files; yields (url, token, root, python)."""
    from test_serve import free_port

    exe = LABEL_STUDIO_VENV / "bin" / "label-studio"
    if not exe.is_file():
        pytest.fail(f"Label Studio is not installed at {LABEL_STUDIO_VENV}: run `make label-studio` (or set "
                    "VISIONTUNE_LABEL_STUDIO_VENV to an environment with label-studio and label-studio-sdk)")
    root, data = tmp_path / "ls root", tmp_path / "ls data"
    root.mkdir()
    port, token = free_port(), "visiontune-test-token-0123"
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "test@visiontune.invalid", "LABEL_STUDIO_PASSWORD": "vt-test-pass-1",
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(root),
           "LATEST_VERSION_CHECK": "false",  # no call to pypi.org from a test
           "COLLECT_ANALYTICS": "false", "SENTRY_DSN": ""}
    log = open(tmp_path / "label-studio.log", "wb")
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data), "--enable-legacy-api-token"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # first start: Django's migrations into a new SQLite file
        while True:
            if proc.poll() is not None:
                pytest.fail("Label Studio exited at start:\n" + (tmp_path / "label-studio.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("Label Studio did not answer /health within 240 s")
            time.sleep(2)
        yield url, token, root, LABEL_STUDIO_VENV / "bin" / "python"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_round_trip_through_a_real_label_studio_server(trained_run, label_studio, tmp_path, capsys, monkeypatch):
    """predict writes tasks and their config; label-studio-sdk creates the project, imports them,
    an annotator accepts the pre-annotations (correcting one) and the JSON export is downloaded;
    ``visiontune train`` reads that export: every annotated image with the annotator's label."""
    url, token, root, python = label_studio
    run, data = trained_run
    shutil.copytree(data, root / "images")
    out = tmp_path / "tasks.json"
    code, _, err = vt_main(capsys, "predict", run.run_dir, root / "images", "--out", out, "--label-studio", root,
                           "--workers", "0")
    assert code == 0, err
    export = tmp_path / "export dir" / "project.json"
    export.parent.mkdir()
    client = subprocess.run([str(python), str(Path(__file__).with_name("label_studio_client.py")), url, token,
                             str(out), str(out.with_suffix(".xml")), str(export)],
                            capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr[-3000:]
    summary = json.loads(client.stdout.strip().splitlines()[-1])
    tasks = json.loads(out.read_text())
    assert summary["imported"] == len(tasks) and summary["annotated"] == sum("predictions" in t for t in tasks)
    assert summary["annotated"] >= 4 and summary["corrected"] is not None

    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(root))  # as the server was told
    rows, skipped = tasks_to_rows(json.loads(export.read_text()), export.parent, export.name)
    assert len(rows) == summary["annotated"] and skipped == len(tasks) - summary["annotated"]
    corrected = str(root / summary["corrected"]["image"].split("=", 1)[1])
    assert (corrected, [summary["corrected"]["label"]]) in rows  # the person's label, not the model's
    assert all(Path(path).is_file() and path.startswith(str(root)) for path, _ in rows)
    code, stdout, err = vt_main(capsys, "train", export, "--epochs", "1", "--run-dir", tmp_path / "from export",
                                "--no-report", *FAST_FLAGS)
    assert code == 0, err
    trained = visiontune.load(tmp_path / "from export")
    assert set(trained.class_names) <= set(run.load().class_names)
