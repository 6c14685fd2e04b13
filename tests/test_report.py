"""``visiontune report``: self-contained HTML (rendered in headless Chromium), single- and multi-label
(calibration: test_calibration.py; Grad-CAM: test_gradcam.py)."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import CLASSES, vt_main
from PIL import Image

from visiontune.evaluation.report import SECTIONS, write_report


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
    odd = tmp_path_factory.mktemp("no known class")
    for i in range(4):  # noise: images of no class (the unknown-score's section)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(odd / f"{i}.png")
    return copy, data, write_report(copy, unknown=odd)


def test_report_has_every_section_and_embeds_images(report_run):
    run_dir, _, path = report_run
    assert path == run_dir / "report.html"
    text = path.read_text()
    parsed = _parse(text)
    assert parsed.h2 == list(SECTIONS.values())  # every section, in order (compare.csv and --unknown exist)
    assert len(parsed.imgs) >= 10 and all(src.startswith("data:image/") for src in parsed.imgs)
    assert not parsed.links and not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    cal = meta["calibration"]
    assert {"temperature", "ece_before", "ece_after", "num_val"} <= set(cal) and cal["temperature"] > 0
    assert cal["ece_after"] <= cal["ece_before"] + 1e-6
    assert (run_dir / "model" / "model.safetensors").stat().st_size > 0
    print(f"report.html: {path.stat().st_size / 1e6:.2f} MB, {len(parsed.imgs)} images, "
          f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} (T={cal['temperature']:.3f})")


def test_report_renders_in_headless_chromium(report_run, browser, tmp_path):
    _, _, path = report_run
    shot = tmp_path / "shot.png"
    page = browser.new_page(viewport={"width": 1200, "height": 3000})
    try:
        page.goto(path.resolve().as_uri())
        page.screenshot(path=str(shot))
        dom = page.content()
    finally:
        page.close()
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1200)
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 2000, f"screenshot looks blank: {colours} colours"  # photos and plots, not a blank page
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


def test_report_has_the_multi_label_sections(ml_run, tmp_path):
    import shutil

    from visiontune.evaluation.report import write_report

    run_dir = tmp_path / "ml run"  # a copy: the report (and a calibration) would write into the shared run
    shutil.copytree(ml_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    page = write_report(run_dir, gradcam=True).read_text()
    for sid in ("per-label", "label-pairs", "label-errors", "gradcam", "calibration", "curves", "dataset"):
        assert f'<section id="{sid}">' in page, sid
    assert "Every (image, label) decision counts once" in page and 'id="confusion"' not in page
    for name in CLASSES:
        assert f"<td class=\"l\">{name}</td>" in page
