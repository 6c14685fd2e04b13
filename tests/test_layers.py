"""The layer contract (import-linter, configured in pyproject.toml): imports point down only, and
adding an upward import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


# slow: `make test` runs `make lint` first, and it runs lint-imports on the same contract; the
# negative check (test_an_upward_import_breaks_the_contract) stays fast
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_layer_contract_is_kept():
    done = lint(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src" / "visiontune", tmp_path / "src" / "visiontune")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    scan = tmp_path / "src" / "visiontune" / "data" / "scan.py"
    scan.write_text(scan.read_text() + "\nfrom ..training.config import TrainConfig  # noqa: E402, F401\n")
    done = lint(tmp_path, tmp_path / "src")
    assert done.returncode != 0 and "BROKEN" in done.stdout
    assert "visiontune.data.scan -> visiontune.training.config" in done.stdout
