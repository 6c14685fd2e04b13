"""``visiontune demo``: the whole pipeline offline; the full demo reaches 97% (slow: make test-slow)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import vt_main


def test_demo_cli_runs(tmp_path, capsys, monkeypatch):
    """The demo subcommand end to end on a few batches; the full demo is test_demo_reaches_97_percent (slow)."""
    from visiontune.pipeline import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(demo.DEMO_OPTIONS, "limit_train_batches", 2)
    monkeypatch.setitem(demo.DEMO_OPTIONS, "limit_val_batches", 2)
    monkeypatch.setitem(demo.DEMO_OPTIONS, "report", False)
    code, out, _ = vt_main(capsys, "demo", "--epochs", "1", "--run-dir", tmp_path / "demo")
    assert code == 0 and "test accuracy" in out and out.strip().splitlines()[-1].startswith("run: ")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_reaches_97_percent(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "visiontune.cli", "demo", "--run-dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=590)
    assert proc.returncode == 0, proc.stderr[-2000:]
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", proc.stdout).group(1))
    assert accuracy >= 0.97
