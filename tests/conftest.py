"""Shared fixtures: a generated 3-class image folder (in a path with a space) and one trained run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
FAST = {"img_size": 32, "batch_size": 8, "workers": 0, "progress": False, "report": False}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's feature cache from tests."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))


def make_image(rng: np.random.Generator, colour, size: int = 40) -> Image.Image:
    arr = rng.integers(0, 90, (size, size, 3)).astype(np.int16)
    arr += np.array(colour, dtype=np.int16) // 2
    x0, y0 = rng.integers(0, size // 2, 2)
    arr[y0:y0 + size // 2, x0:x0 + size // 2] = colour  # a solid square of the class colour
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_folder(root: Path, per_class: int = 12, seed: int = 0, fmt: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rng, colour).save(root / name / f"{name}_{i:02d}.{fmt}")
    return root


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "my data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short finetune run reused by evaluate/predict tests."""
    import visiontune

    base = tmp_path_factory.mktemp("trained run")
    os.environ.setdefault("VISIONTUNE_CACHE", str(base / "cache"))
    data = make_folder(base / "data", per_class=10)
    run = visiontune.train(data, epochs=2, run_dir=str(base / "run"), **FAST)
    return run, data
