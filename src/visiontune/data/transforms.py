"""Tensor transforms built from a :class:`~visiontune.data.preprocess.Preprocessing` spec.

The evaluation transform *is* :func:`visiontune.data.preprocess.preprocess` (the one
definition of the eval pixels); the training transforms add augmentation in front of the same
normalisation, so train and test differ only by the augmentation, never by the scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from .preprocess import Preprocessing, letterbox, normalize, preprocess, resize
from .registry import AUGMENTS

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


class SpecStep:
    """One preprocessing function of a PIL image bound to a spec: ``fn(img, spec)`` (picklable,
    so loader workers can take it)."""

    def __init__(self, fn: Callable, spec: Preprocessing):
        self.fn, self.spec = fn, spec

    def __call__(self, img: Image.Image):
        out = self.fn(img, self.spec)
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else out

    def __repr__(self) -> str:
        return f"{self.fn.__name__}({self.spec.resize_mode}, {self.spec.height}x{self.spec.width})"


def eval_transform(spec: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic transform for validation, evaluation, prediction and export parity: exactly
    :func:`~visiontune.data.preprocess.preprocess`, as a tensor."""
    return SpecStep(preprocess, spec)


def train_transform(spec: Preprocessing, augment: str = "standard") -> Callable[[Image.Image], torch.Tensor]:
    """Training transform; ``augment`` is a name in :data:`AUGMENTS`.

    - none: the eval transform.
    - light: the eval resize plus horizontal flip.
    - standard: RandomResizedCrop (on the letterboxed image in letterbox mode) plus flip.
    - strong: standard plus TrivialAugmentWide and random erasing.
    """
    AUGMENTS.check(augment)
    if augment == "none":
        return eval_transform(spec)
    if augment == "light":
        return v2.Compose([SpecStep(resize, spec), v2.RandomHorizontalFlip(), SpecStep(normalize, spec)])
    interp = INTERPOLATIONS[spec.interpolation]
    spatial: list = []
    scale = (0.25, 1.0)
    if spec.resize_mode == "letterbox":
        spatial = [SpecStep(letterbox, spec)]
        scale = (0.5, 1.0)
    spatial += [
        v2.RandomResizedCrop((spec.height, spec.width), scale=scale, interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "standard":
        return v2.Compose([*spatial, SpecStep(normalize, spec)])
    return v2.Compose([*spatial, v2.TrivialAugmentWide(interpolation=interp), SpecStep(normalize, spec),
                       v2.RandomErasing(p=0.25, value=0)])


def denormalize(tensor: torch.Tensor, spec: Preprocessing) -> np.ndarray:
    """A normalised CHW tensor back to HWC floats in 0..1 (for galleries and Grad-CAM overlays)."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (tensor.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)
