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
    - crop-flip: the eval resize, a random crop from it padded by an eighth (reflected), flip.
    """
    AUGMENTS.check(augment)
    if augment == "none":
        return eval_transform(spec)
    if augment == "crop-flip":
        pad = max(1, min(spec.height, spec.width) // 8)
        return v2.Compose([SpecStep(resize, spec), v2.Pad(pad, padding_mode="reflect"),
                           v2.RandomCrop((spec.height, spec.width)), v2.RandomHorizontalFlip(),
                           SpecStep(normalize, spec)])
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


class NormalizeTensor:
    """uint8 CHW tensor -> float32, scaled to 0..1 and normalised: :func:`normalize`'s arithmetic."""

    def __init__(self, spec: Preprocessing):
        self.scale = torch.tensor(1.0 / 255.0, dtype=torch.float32)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.scale - self.mean) / self.std


class LetterboxTensor:
    """:func:`letterbox` for a uint8 CHW tensor (resize the longer side to fit, pad with the mean)."""

    def __init__(self, spec: Preprocessing):
        self.spec = spec
        self.fill = [int(round(255 * m)) for m in spec.mean]
        self.interp = INTERPOLATIONS[spec.interpolation]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.spec.height, self.spec.width
        scale = min(width / x.shape[-1], height / x.shape[-2])
        new_h, new_w = max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale))
        x = v2.functional.resize(x, [new_h, new_w], interpolation=self.interp, antialias=True)
        top, left = (height - new_h) // 2, (width - new_w) // 2
        return v2.functional.pad(x, [left, top, width - new_w - left, height - new_h - top], fill=self.fill)


def tensor_eval_geometry(spec: Preprocessing) -> list:
    """The deterministic resize of ``spec.resize_mode`` as tensor ops (for augmentation pipelines)."""
    interp = INTERPOLATIONS[spec.interpolation]
    if spec.resize_mode == "letterbox":
        return [LetterboxTensor(spec)]
    if spec.resize_mode == "squash":
        return [v2.Resize((spec.height, spec.width), interpolation=interp, antialias=True)]
    return [v2.Resize(spec.resize_side(), interpolation=interp, antialias=True),
            v2.CenterCrop((spec.height, spec.width))]


def tensor_train_transform(spec: Preprocessing, augment: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation of ``augment`` for uint8 CHW tensors held in memory.

    The same recipes as :func:`train_transform` (whose PIL version serves images read from disk),
    with ``crop-flip`` adding the recipe of small images: the eval resize, then a random crop of
    the input size from it padded by an eighth on each side (reflected), and a flip. (``none`` and
    ``light`` need no transform here: :class:`~visiontune.data.memory.MemoryEvalSet` keeps their
    exact pixels.)
    """
    AUGMENTS.check(augment)
    interp = INTERPOLATIONS[spec.interpolation]
    size = (spec.height, spec.width)
    if augment == "crop-flip":
        pad = max(1, min(size) // 8)
        steps = [*tensor_eval_geometry(spec), v2.Pad(pad, padding_mode="reflect"), v2.RandomCrop(size),
                 v2.RandomHorizontalFlip()]
        return v2.Compose([*steps, NormalizeTensor(spec)])
    if augment in ("none", "light"):
        steps = tensor_eval_geometry(spec) + ([v2.RandomHorizontalFlip()] if augment == "light" else [])
        return v2.Compose([*steps, NormalizeTensor(spec)])
    spatial: list = []
    scale = (0.25, 1.0)
    if spec.resize_mode == "letterbox":
        spatial, scale = [LetterboxTensor(spec)], (0.5, 1.0)
    spatial += [v2.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip()]
    if augment == "standard":
        return v2.Compose([*spatial, NormalizeTensor(spec)])
    # torchvision's tensor affine ops (rotate, shear) offer nearest and bilinear only
    return v2.Compose([*spatial, v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR),
                       NormalizeTensor(spec), v2.RandomErasing(p=0.25, value=0)])


def denormalize(tensor: torch.Tensor, spec: Preprocessing) -> np.ndarray:
    """A normalised CHW tensor back to HWC floats in 0..1 (for galleries and Grad-CAM overlays)."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (tensor.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)
