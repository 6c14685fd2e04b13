"""Preprocessing built from the backbone's own pretrained config, the same at train and test time.

A *preprocessing* dict travels with every saved model (``model.json``)::

    {"input_size": [3, 224, 224], "mean": [...], "std": [...], "interpolation": "bicubic",
     "crop_pct": 0.875, "resize_mode": "crop"}

so evaluation, prediction and export rebuild exactly the transform used in training.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}
PIL_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class Letterbox:
    """Resize the longer side to fit and pad to the target size with the mean colour.

    Keeps the whole of a non-square image (nothing cropped, nothing distorted); the padding
    normalises to zero, so it carries no signal.
    """

    def __init__(self, size: tuple[int, int], interpolation: str, fill: tuple[int, int, int]):
        self.size = size
        self.interpolation = PIL_INTERPOLATIONS[interpolation]
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        height, width = self.size
        scale = min(width / img.width, height / img.height)
        new_w, new_h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        resized = img.resize((new_w, new_h), self.interpolation)
        canvas = Image.new("RGB", (width, height), self.fill)
        canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"Letterbox(size={self.size})"


def image_size(pre: dict[str, Any]) -> tuple[int, int]:
    _, height, width = pre["input_size"]
    return int(height), int(width)


def draft_size(pre: dict[str, Any]) -> int | None:
    """Smallest decode size that loses nothing for this preprocessing (None: full decode).

    With ``jpeg_draft``, JPEGs much larger than the network input are decoded at 1/2, 1/4 or
    1/8 scale by libjpeg (Pillow ``draft``), never below the size the resize step needs.
    """
    if not pre.get("jpeg_draft"):
        return None
    height, width = image_size(pre)
    if pre.get("resize_mode", "crop") == "crop":
        return int(max(height, width) / float(pre.get("crop_pct", 0.875) or 1.0))
    return max(height, width)


def _resize_stage(pre: dict[str, Any]) -> list:
    height, width = image_size(pre)
    mode = pre.get("resize_mode", "crop")
    interp = pre.get("interpolation", "bilinear")
    if mode == "letterbox":
        fill = tuple(int(round(255 * m)) for m in pre["mean"])
        return [Letterbox((height, width), interp, fill)]
    if mode == "squash":
        return [v2.Resize((height, width), interpolation=INTERPOLATIONS[interp], antialias=True)]
    crop_pct = float(pre.get("crop_pct", 0.875) or 1.0)
    if height == width:
        scale_size: int | tuple[int, int] = int(height / crop_pct)
    else:
        scale_size = (int(height / crop_pct), int(width / crop_pct))
    return [
        v2.Resize(scale_size, interpolation=INTERPOLATIONS[interp], antialias=True),
        v2.CenterCrop((height, width)),
    ]


def _to_tensor(pre: dict[str, Any]) -> list:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre["mean"]), std=list(pre["std"])),
    ]


def eval_transform(pre: dict[str, Any]) -> v2.Compose:
    """Deterministic transform for validation, evaluation, prediction and export parity."""
    return v2.Compose(_resize_stage(pre) + _to_tensor(pre))


def train_transform(pre: dict[str, Any], augment: str = "standard") -> v2.Compose:
    """Training transform; ``augment`` is one of none, light, standard, strong.

    - none: the eval transform.
    - light: the eval transform plus horizontal flip.
    - standard: RandomResizedCrop (on the letterboxed image in letterbox mode) plus flip.
    - strong: standard plus TrivialAugmentWide and random erasing.
    """
    if augment == "none":
        return eval_transform(pre)
    height, width = image_size(pre)
    interp = INTERPOLATIONS[pre.get("interpolation", "bilinear")]
    if augment == "light":
        return v2.Compose(_resize_stage(pre) + [v2.RandomHorizontalFlip()] + _to_tensor(pre))
    spatial: list = []
    scale = (0.25, 1.0)
    if pre.get("resize_mode") == "letterbox":
        spatial = _resize_stage(pre)
        scale = (0.5, 1.0)
    spatial += [
        v2.RandomResizedCrop((height, width), scale=scale, interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "standard":
        return v2.Compose(spatial + _to_tensor(pre))
    if augment == "strong":
        return v2.Compose(
            spatial
            + [v2.TrivialAugmentWide(interpolation=interp)]
            + _to_tensor(pre)
            + [v2.RandomErasing(p=0.25, value=0)]
        )
    raise ValueError(f"augment={augment!r} is not valid; choose one of: none, light, standard, strong")
