"""Shared helpers and fixtures: generated image folders (in paths with spaces), corrupt files,
one session-scoped trained run, a reference forward pass, and CLI runners.

Tests import the helpers from here (``from conftest import make_folder``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from PIL import Image

from visiontune.core.hardware import cpu_count

# make test runs one pytest-xdist worker per core: each worker, and the CLI subprocesses it starts, gets
# its share of the cores (workers each using every core would thrash them)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

CLASSES = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
CLASS_NAMES = sorted(CLASSES)
FAST = {"img_size": 32, "batch_size": 8, "workers": 0, "progress": False, "report": False}
FAST_FLAGS = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress"]
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
           ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}


# Property-based fuzzing of the parsers of untrusted input (tests marked ``fuzz``): a fast,
# derandomised profile in `make test` (the same examples every run), a long random one in
# `make test-slow` (VISIONTUNE_FUZZ=long). No example database is written into the checkout.
settings.register_profile("fast", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=1500, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("VISIONTUNE_FUZZ", "fast"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's feature cache from tests."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
    # predict/evaluate/serve default to --backend auto, which exports and times every new model once
    # (seconds each): the many throwaway models here run eager; tests/test_runtime.py covers auto,
    # the CLI default included
    monkeypatch.setenv("VISIONTUNE_BACKEND", "eager")


# ----------------------------------------------------------------------------- images and folders
def make_image(rng: np.random.Generator, colour, size: int = 40) -> Image.Image:
    """Pixel noise tinted with ``colour`` and a solid square of the class colour at a random place."""
    arr = rng.integers(0, 90, (size, size, 3)).astype(np.int16)
    arr += np.array(colour, dtype=np.int16) // 2
    x0, y0 = rng.integers(0, size // 2, 2)
    arr[y0:y0 + size // 2, x0:x0 + size // 2] = colour
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save_image(img: Image.Image, path: Path, **params) -> Path:
    """Save in the format implied by the suffix, converting modes the format cannot store."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = FORMATS[path.suffix.lower()]
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    if fmt in ("BMP", "PPM") and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(path, fmt, **params)
    return path


def make_folder(root: Path, per_class: int = 12, seed: int = 0, size: int = 40, classes: dict | None = None,
                ext: str = ".png") -> Path:
    """``root/<class>/<class>_<i><ext>`` for each colour class; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or CLASSES).items():
        for i in range(per_class):
            save_image(make_image(rng, colour, size), Path(root) / name / f"{name}_{i:02d}{ext}")
    return Path(root)


def write_corrupt_files(folder: Path) -> dict[str, Path]:
    """A zero-byte file, a text file named .jpg and a JPEG cut in half."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.jpg"
    text.write_text("this is not an image\n")
    whole = folder / "whole.jpg"
    make_image(np.random.default_rng(1), (200, 30, 30), 64).save(whole, "JPEG", quality=95)
    data = whole.read_bytes()
    whole.unlink()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    return {"empty": empty, "text": text, "truncated": truncated}


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """A fresh 3-class folder (12 images each) under a path with a space."""
    return make_folder(tmp_path / "my data")


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory) -> Path:
    """A 3-class folder for tests that only read it (never modify it)."""
    return make_folder(tmp_path_factory.mktemp("shared") / "my data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short finetune run (calibrated) reused by evaluate/predict/export/serve tests."""
    import visiontune

    base = tmp_path_factory.mktemp("trained run")
    os.environ.setdefault("VISIONTUNE_CACHE", str(base / "cache"))
    data = make_folder(base / "data", per_class=10)
    run = visiontune.train(data, epochs=2, run_dir=str(base / "run"), **FAST)
    return run, data


# ----------------------------------------------------------------------------- multi-label data
SHAPE = 14  # side of each coloured square in a 40 px image


def make_multilabel(root: Path, n: int = 36, seed: int = 0, fmt: str = "labels", delim: str = " ") -> Path:
    """Images with 0-3 coloured squares of different kinds at random places; label set = the colours.

    ``fmt``: ``labels`` (``path,labels``) or ``onehot``. Returns the CSV's path.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8)
        present = [c for c in CLASSES if rng.random() < 0.45] if i >= 3 else [list(CLASSES)[i]]
        for name in present:
            x0, y0 = rng.integers(0, 40 - SHAPE, 2)
            arr[y0:y0 + SHAPE, x0:x0 + SHAPE] = CLASSES[name]
        save_image(Image.fromarray(arr), root / "img" / f"im {i:03d}.png")
        rows.append((f"img/im {i:03d}.png", present))
    path = root / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if fmt == "onehot":
            writer.writerow(["path", *CLASSES])
            writer.writerows([p, *(int(c in labels) for c in CLASSES)] for p, labels in rows)
        else:
            writer.writerow(["path", "labels"])
            writer.writerows([p, delim.join(labels)] for p, labels in rows)
    return path


@pytest.fixture(scope="session")
def ml_data(tmp_path_factory) -> Path:
    return make_multilabel(tmp_path_factory.mktemp("multi label") / "my data", n=48)


@pytest.fixture(scope="session")
def ml_run(ml_data, tmp_path_factory):
    """One short multi-label finetune run, shared by the inference tests."""
    import visiontune

    base = tmp_path_factory.mktemp("ml")
    os.environ.setdefault("VISIONTUNE_CACHE", str(base / "cache"))  # before the per-test cache fixture exists
    return visiontune.train(ml_data, epochs=2, freeze_epochs=1, run_dir=str(base / "run"), **FAST)


# ----------------------------------------------------------------------------- reference forward pass
def reference_probabilities(model_dir: Path, files: list[str]) -> tuple[torch.Tensor, dict]:
    """Probabilities from a freshly built network given the saved weights, without Classifier.

    Rebuilds the architecture named in model.json, loads model.safetensors strictly, applies the
    saved preprocessing and (if the model was calibrated) its temperature.
    """
    from safetensors.torch import load_file

    from visiontune.data.image import load_image
    from visiontune.data.preprocess import Preprocessing, preprocess
    from visiontune.models.factory import build_model

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    arch = meta["architecture"]
    name = arch["name"] if arch["source"] == "timm" else f"torchvision:{arch['name']}"
    model, _, _ = build_model(name, arch["num_classes"], weights="none")
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=True)
    model.eval()
    spec = Preprocessing.from_dict(meta["preprocessing"])
    batch = torch.stack([torch.from_numpy(preprocess(load_image(f), spec)) for f in files])
    temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))
    with torch.no_grad():
        logits = model(batch)
        tta = (meta.get("inference") or {}).get("tta")
        if tta == "flip":  # the mean with the mirror image
            logits = (logits + model(batch.flip(-1))) / 2
        elif tta == "flip-zoom":  # ... with the mirror image enlarged by a sixth in 32-px steps, written out here
            side = tuple(n + 32 * max(1, round(n / 192)) for n in batch.shape[-2:])
            zoomed = torch.nn.functional.interpolate(batch, size=side, mode="bilinear", align_corners=False)
            logits = (logits + model(zoomed.flip(-1))) / 2
        return torch.softmax(logits / temperature, dim=1), meta


def rows_probabilities(rows: list[dict], class_names: list[str]) -> torch.Tensor:
    """Per-class probabilities from prediction rows (top_k must cover every class)."""
    return torch.tensor([[next(t["probability"] for t in r["top_k"] if t["label"] == name)
                          for name in class_names] for r in rows])


# ----------------------------------------------------------------------------- the CLI
def vt(*args, check: bool = True, timeout: int = 280, **kw) -> subprocess.CompletedProcess:
    """Run ``visiontune ARGS`` through the real console entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "visiontune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_cmd(*args) -> list[str]:
    """The command line of a small ``visiontune train ARGS`` run in a subprocess (32 px, batch 4)."""
    return [sys.executable, "-m", "visiontune.cli", "train", *map(str, args), "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--no-report", "--no-progress"]


def vt_main(capsys, *args) -> tuple[int, str, str]:
    """Run ``visiontune ARGS`` in this process (``visiontune.cli.main``): (exit code, stdout, stderr).

    The same parser and handlers as the console script, without a new interpreter's start-up.
    """
    from visiontune.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors and --help
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 3-class efficientnet_lite0 at 64 px saved like a training run, with calibration (T=1.5)
    and JPEG data; onnxruntime's int8 depthwise kernels reject the 1x1 maps of 32 px.

    Instead of training, the head is fitted in closed form (logistic regression on the frozen
    features, a second): real class margins, so int8 agreement is meaningful, not a coin toss.
    """
    from sklearn.linear_model import LogisticRegression

    from visiontune.data.image import load_image
    from visiontune.data.preprocess import preprocess
    from visiontune.models.artifact import save_model
    from visiontune.models.card import ModelCard
    from visiontune.models.factory import build_model

    base = tmp_path_factory.mktemp("export tiny")
    data = make_folder(base / "data", per_class=8, ext=".jpg")
    model, arch, pre = build_model("efficientnet_lite0", 3)
    pre = pre.with_size(64)
    paths = sorted(data.rglob("*.jpg"))
    x = torch.stack([torch.from_numpy(preprocess(load_image(p), pre)) for p in paths])
    labels = [CLASS_NAMES.index(p.parent.name) for p in paths]
    with torch.no_grad():
        features = model.eval().forward_head(model.forward_features(x), pre_logits=True).numpy()
    fit = LogisticRegression(C=10.0, max_iter=2000).fit(features, labels)
    head = model.get_submodule(arch.classifier)
    head.weight.data = torch.tensor(fit.coef_, dtype=torch.float32)
    head.bias.data = torch.tensor(fit.intercept_, dtype=torch.float32)
    card = ModelCard(CLASS_NAMES, pre, arch, calibration={"temperature": 1.5},  # as training records its run:
                     training={"data": str(data), "seed": 0, "run_dir": os.path.realpath(base / "run")})
    save_model(base / "run" / "model", model, card)
    return base / "run", data


@pytest.fixture(scope="session")
def onnx_file(tiny_model):
    """``tiny_model`` exported to ONNX with a dynamic batch."""
    from visiontune.export.exporter import export_model

    return Path(export_model(tiny_model[0], "onnx", dynamic_batch=True)["file"])


@pytest.fixture(scope="session")
def openvino_folder(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` exported to OpenVINO (dynamic batch), once; tests that change it work on a copy."""
    from visiontune.export.exporter import export_model

    out = tmp_path_factory.mktemp("open vino") / "ov" / "model.xml"
    assert export_model(tiny_model[0], "openvino", out=out, dynamic_batch=True)["passed"]
    return out.parent


# ----------------------------------------------------------------------------- the runtime cache
@pytest.fixture(scope="session")
def measured_runtime(tiny_model, tmp_path_factory):
    """``prepare_runtime`` of tiny_model measured once (ONNX + OpenVINO export, parity, timing:
    seconds) in a cache of its own: (cache, choice, the lines it logged). Tests work on copies
    (``measured_cache``)."""
    from visiontune.export.runtime import prepare_runtime

    cache = tmp_path_factory.mktemp("measured cache") / "cache"
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISIONTUNE_CACHE", str(cache))
        choice = prepare_runtime(tiny_model[0], log=lines.append)
    return cache, choice, lines


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of this test's own (VISIONTUNE_CACHE)."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def measured_cache(own_cache, measured_runtime) -> Path:
    """``own_cache`` holding the measured entry (the key does not depend on where the cache is)."""
    import shutil

    shutil.copytree(measured_runtime[0], own_cache, symlinks=True)
    return own_cache


def refuse_to_measure(monkeypatch) -> None:
    """A new measurement fails at once (it is recorded as eager with the reason, like any failure)."""
    from visiontune.export import runtime

    def refuse(*args, **kwargs):
        raise RuntimeError("no measurement in this test")

    monkeypatch.setattr(runtime, "_measure", refuse)


# ----------------------------------------------------------------------------- serving
CHROMIUM = "/usr/bin/chromium"  # Debian's Chromium, driven by Playwright (never `playwright install`)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (each test opens its own page). Module-scoped, not
    session: a live sync-Playwright loop on the main thread would break later ``asyncio.run`` calls."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    pw = sync_api.sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        pw.stop()


@pytest.fixture(scope="session")
def clf(trained_run):
    """``trained_run`` loaded once (the serve tests share it; they do not change it)."""
    import visiontune

    return visiontune.load(trained_run[0].run_dir)


@pytest.fixture(scope="session")
def server(clf):
    """A live uvicorn server of ``clf`` (/v1 and the Open Inference Protocol); yields its base URL."""
    from test_serve import running_server  # the server helper lives with the HTTP tests

    with running_server(clf) as url:
        yield url
