"""Helpers for the detailed test modules (test_*_details.py, test_training_invariants.py,
test_cli_extra.py): image writers, corrupt files, and a reference forward pass.

Kept out of conftest.py so these modules do not depend on its helper names; they only rely on
its autouse fixture that points VISIONTUNE_CACHE at a temporary folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 210)}
CLASS_NAMES = sorted(COLOURS)
TINY = {"img_size": 32, "batch_size": 8, "workers": 0, "progress": False}
TINY_FLAGS = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress"]
METRIC_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "epoch_seconds", "train_images_per_second"]


def colour_image(colour, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """RGB image dominated by ``colour`` with pixel noise and one random ellipse/rectangle."""
    base = np.array(colour, dtype=np.float64)[None, None, :]
    arr = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(0, size - size // 4, 2))
    w, h = (int(v) for v in rng.integers(size // 8, size // 4 + 1, 2))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=fill)
    return img


def make_image_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0,
                      classes: dict | None = None, ext: str = ".png") -> Path:
    """``root/<class>/<class>_<i>.png`` for each colour class; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or COLOURS).items():
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            save_image(colour_image(colour, rng, size), folder / f"{name}_{i:02d}{ext}")
    return Path(root)


FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
           ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}


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


def write_corrupt_files(folder: Path) -> dict[str, Path]:
    """A zero-byte file, a text file named .jpg and a JPEG cut in half."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.jpg"
    text.write_text("this is not an image\n")
    whole = folder / "whole.jpg"
    colour_image((200, 30, 30), np.random.default_rng(1), 64).save(whole, "JPEG", quality=95)
    data = whole.read_bytes()
    whole.unlink()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    return {"empty": empty, "text": text, "truncated": truncated}


def reference_probabilities(model_dir: Path, files: list[str]) -> tuple[torch.Tensor, dict]:
    """Probabilities from a freshly built network given the saved weights, without Classifier.

    Rebuilds the architecture named in model.json, loads model.safetensors strictly, applies the
    saved preprocessing and (if the model was calibrated) its temperature.
    """
    from safetensors.torch import load_file

    from visiontune.data.image import load_image
    from visiontune.data.transforms import eval_transform
    from visiontune.models import build_model

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    arch = meta["architecture"]
    name = arch["name"] if arch["source"] == "timm" else f"torchvision:{arch['name']}"
    model, _, _ = build_model(name, arch["num_classes"], weights="none")
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=True)
    model.eval()
    transform = eval_transform(meta["preprocessing"])
    batch = torch.stack([transform(load_image(f)) for f in files])
    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    with torch.no_grad():
        return torch.softmax(model(batch) / temperature, dim=1), meta


def rows_probabilities(rows: list[dict], class_names: list[str]) -> torch.Tensor:
    """Per-class probabilities from Classifier.predict rows (top_k must cover every class)."""
    return torch.tensor([[next(t["probability"] for t in r["top_k"] if t["label"] == name)
                          for name in class_names] for r in rows])


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "visiontune.cli", *map(str, args)]
