"""``visiontune report``: self-contained HTML (rendered in headless Chromium), calibration, Grad-CAM."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import vt_main
from PIL import Image

from visiontune.evaluation.calibration import expected_calibration_error, fit_temperature
from visiontune.evaluation.report import SECTIONS, write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.h2, self.links, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag in ("link", "script", "iframe") or (tag == "a" and not attrs.get("href", "#").startswith("#")):
            self.links.append((tag, attrs))
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())


def _parse(text: str) -> _Collect:
    parser = _Collect()
    parser.feed(text)
    return parser


@pytest.fixture(scope="module")
def report_run(trained_run, tmp_path_factory):
    """A copy of the shared trained run (the report writes calibration into model.json)."""
    run, data = trained_run
    copy = tmp_path_factory.mktemp("report run") / "run"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "report.html"))
    (copy / "model" / "model.json").write_text(json.dumps(
        {k: v for k, v in json.loads((copy / "model" / "model.json").read_text()).items() if k != "calibration"}))
    (copy / "compare.csv").write_text("strategy,model,accuracy,macro_f1,train_seconds,model_size_mb,run_dir\n"
                                      "finetune,efficientnet_lite0,0.9,0.89,12.5,13.4,x\n")
    return copy, data, write_report(copy)


def test_report_has_every_section_and_embeds_images(report_run):
    run_dir, _, path = report_run
    assert path == run_dir / "report.html"
    text = path.read_text()
    parsed = _parse(text)
    assert parsed.h2 == list(SECTIONS.values())  # every section, in order (compare.csv exists)
    assert len(parsed.imgs) >= 10 and all(src.startswith("data:image/") for src in parsed.imgs)
    assert not parsed.links and not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    cal = meta["calibration"]
    assert {"temperature", "ece_before", "ece_after", "num_val"} <= set(cal) and cal["temperature"] > 0
    assert cal["ece_after"] <= cal["ece_before"] + 1e-6
    assert (run_dir / "model" / "model.safetensors").stat().st_size > 0
    print(f"report.html: {path.stat().st_size / 1e6:.2f} MB, {len(parsed.imgs)} images, "
          f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} (T={cal['temperature']:.3f})")


def test_report_renders_in_headless_chromium(report_run, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install -y chromium to render the report")
    _, _, path = report_run
    url = path.resolve().as_uri()
    shot = tmp_path / "shot.png"
    common = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    # its own session: a crashing Chromium's signals to its process group never reach pytest
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,3000", url],
                   check=True, capture_output=True, timeout=120, start_new_session=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1200)
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 2000, f"screenshot looks blank: {colours} colours"  # photos and plots, not a blank page
    dom = subprocess.run(common + ["--dump-dom", url], check=True, capture_output=True, text=True, timeout=120,
                         start_new_session=True).stdout
    parsed = _parse(dom)
    assert parsed.h2 == list(SECTIONS.values())
    assert parsed.imgs and all(src.startswith("data:image/") for src in parsed.imgs)


def test_report_cli_on_other_data(report_run, capsys):
    run_dir, data, _ = report_run
    code, out, _ = vt_main(capsys, "report", run_dir, "--data", data, "--no-gradcam")
    assert code == 0
    assert f"report: {run_dir / 'report.html'}" in out
    parsed = _parse((run_dir / "report.html").read_text())
    assert "Grad-CAM" not in parsed.h2 and "Calibration" in parsed.h2
    assert "evaluated on the data" in (run_dir / "report.html").read_text()


def test_fit_temperature_recovers_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen).squeeze(1)
    overconfident = true_logits * 3  # calibrated at T = 3
    t = fit_temperature(overconfident, labels)
    assert 2.7 < t < 3.3
    before = expected_calibration_error(torch.softmax(overconfident, 1), labels)
    after = expected_calibration_error(torch.softmax(overconfident / t, 1), labels)
    assert after < 0.03 < before
    perfect = torch.tensor([[0.9, 0.1]] * 10)
    assert expected_calibration_error(perfect, torch.tensor([0] * 9 + [1])) == pytest.approx(0.0, abs=1e-6)


def test_calibration_never_sharpens_without_errors_and_keeps_few_errors_doubtful():
    """No error: T >= 1 (a set answered all right cannot show by how much to sharpen). A few
    errors: T may sharpen an under-confident model, but no wrong answer rises above p = 0.99."""
    from visiontune.evaluation.calibration import MAX_WRONG_CONFIDENCE, calibration_summary

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    margins = 0.5 + torch.rand(200, generator=gen)  # right answers, timid logits: under-confident
    logits = torch.stack([-margins / 2, margins / 2], 1)
    logits[labels == 0] = logits[labels == 0].flip(1)
    all_right = calibration_summary(logits, labels)
    assert all_right["errors"] == 0 and all_right["temperature"] >= 1.0
    few = logits.clone()
    few[:3] = few[:3].flip(1) * 2  # three confident mistakes
    entry = calibration_summary(few, labels)
    t = entry["temperature"]
    assert entry["errors"] == 3 and t < 1.0  # sharpened: the right answers were timid
    wrong = few.argmax(1) != labels
    assert float(torch.softmax(few[wrong].double() / t, 1).max()) <= MAX_WRONG_CONFIDENCE + 1e-6
    assert entry["ece_after"] < entry["ece_before"]
    low, high = entry["temperature_range"]  # rounded to 4 decimals
    assert low - 1e-4 <= t <= high + 1e-4


def test_gradcam_explain_writes_overlays(trained_run, tmp_path):
    import visiontune
    from visiontune.evaluation.gradcam import explain

    run, data = trained_run
    clf = visiontune.load(run.run_dir)
    paths = sorted(str(p) for p in data.rglob("*.png"))[:3] + [str(tmp_path / "missing.png")]
    written = explain(clf, paths, tmp_path / "cam")
    assert len(written) == 3 and all(p.name.endswith(".gradcam.png") for p in written)
    pre = clf.preprocessing
    assert Image.open(written[0]).size == (pre.width, pre.height)
    assert len(np.unique(np.asarray(Image.open(written[0])).reshape(-1, 3), axis=0)) > 10


@pytest.mark.parametrize("name,layer", [("torchvision:resnet18", "layer4"), ("resnet18", "layer4"),
                                        ("efficientnet_lite0", "bn2")])
def test_gradcam_target_layer_for_timm_and_torchvision(name, layer, tmp_path):
    from visiontune.evaluation.gradcam import explain, find_target_layer
    from visiontune.inference.classifier import Classifier
    from visiontune.inference.runners import TorchRunner
    from visiontune.models.card import ModelCard
    from visiontune.models.factory import build_model

    model, arch, pre = build_model(name, 3, weights="default" if name == "efficientnet_lite0" else "none")
    assert find_target_layer(model, pre.input_size)[0] == layer
    if name.startswith("torchvision"):
        clf = Classifier(TorchRunner(model, "32"), ModelCard(["a", "b", "c"], pre.with_size(64), arch))
        Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "x.png")
        assert len(explain(clf, [str(tmp_path / "x.png")], tmp_path)) == 1
