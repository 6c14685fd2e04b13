"""scikit-learn's digits (1,797 real 8x8 scans, 10 classes) as an ImageFolder for the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .scan import stratified_split


def materialise_digits(root: str | Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write digits as ``root/{train,test}/<digit>/*.png`` upscaled to ``size`` pixels.

    The test split is held out from training entirely; training carves its own val split.

    Example:
        root = materialise_digits("/tmp/digits")
    """
    from sklearn.datasets import load_digits  # lazy: only the demo needs scikit-learn's datasets

    root = Path(root)
    digits = load_digits()
    samples = [(str(i), int(t)) for i, t in enumerate(digits.target)]
    train, test = stratified_split(samples, test_fraction, seed)
    for split, items in (("train", train), ("test", test)):
        for index, label in items:
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[int(index)] / 16.0 * 255.0).astype(np.uint8)
            image = Image.fromarray(255 - pixels, mode="L")  # dark ink on white paper
            image.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{int(index):04d}.png")
    return root
