"""Test-time augmentation: the views of an image a prediction averages, defined once.

A model's card names its mode (``inference.tta``); the PyTorch runner, the unknown-score, the
export wrapper (so ONNX, OpenVINO and TorchScript graphs carry the views built in) and the export
parity reference all take their views from :func:`views`, and training validates with them.

- ``flip``: the image and its mirror image (2 forward passes).
- ``flip-zoom``: the image and its mirror image enlarged by whole steps of 32 px, about a sixth of
  the side and at least 32 px (:func:`zoomed_side`: 96 -> 128, 128 -> 160, 224 -> 256; bilinear,
  from the preprocessed input, so a graph does it too): 2 forward passes, the second at 1.3x (224
  px) to 2.2x (64 px) the pixels.

Measured on CIFAR-10's 10,000 held-out images (``python -m bench.tta``; bench/RESULTS.md,
"Test-time augmentation"): the 15-minute EfficientNet-Lite0 fine-tune at 96 px scored none 0.8928,
flip 0.8982, flip-zoom (128 px) 0.9008; the 30-minute one at 128 px none 0.9040, flip 0.9089,
flip-zoom (160 px) 0.9102. The second view alone at the larger size scores below the first (0.8744
at 128 px): what pays is averaging two views that differ.

Example:
    >>> x = torch.zeros(2, 3, 96, 96)
    >>> [tuple(v.shape[-2:]) for v in views(x, "flip-zoom")]
    [(96, 96), (128, 128)]
    >>> tta_mode(True), tta_mode(False), tta_mode("flip-zoom"), view_cost("flip-zoom", 96), view_cost("flip-zoom", 224)
    ('flip', '', 'flip-zoom', 2.78, 2.31)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry

TTA_MODES = Registry.choices("tta", {
    "none": "one view: the image as preprocessed",
    "flip": "the image and its mirror image",
    "flip-zoom": "the image and its mirror image enlarged in steps of 32 px (96 -> 128, 224 -> 256 px; 2.3x the "
                 "cost of one view at 224 px, 2.8x at 96)",
})
# what a mode's prediction averages, in words (the model card's README)
TTA_VIEWS = {"flip": "the logits of the image and of its mirror image",
             "flip-zoom": "the logits of the image and of its mirror image enlarged (bilinear, from the "
                          "preprocessed input, align_corners false) to the side plus 32 px times max(1, round(side / "
                          "192)): 96 -> 128, 224 -> 256"}
# the zoomed view grows each side by a sixth, rounded to whole steps of ZOOM_STEP px (at least one): the
# networks' total stride, so each strided layer sees an input of the same parity as at the model's own
# size and an exported graph's fixed "same" padding (TF-ported EfficientNets) stays right for both views.
# Measured on the 15-min CIFAR-10 model at 96 px, with the plain view: 112 px 0.9026, 128 px 0.9014
# (112 would need other padding); on the 30-min model at 128 px: 144 px 0.9082, 160 px 0.9098
ZOOM_STEP = 32


def tta_mode(value: bool | str | None) -> str:
    """A TTA setting as a mode name: ``""`` for none (False, None, ``"none"``), ``"flip"`` for True,
    else a name of :data:`TTA_MODES` (a clear ConfigError for any other)."""
    if value is None or value is False or value in ("", "none"):
        return ""
    if value is True:
        return "flip"
    if not isinstance(value, str) or value not in TTA_MODES:
        raise ConfigError(f"unknown test-time augmentation {value!r}; choose one of: {', '.join(TTA_MODES)}")
    return value


def zoomed_side(side: int) -> int:
    """The zoomed view's side for a side of ``side`` px (96 -> 128, 128 -> 160, 224 -> 256, 384 -> 448)."""
    return side + ZOOM_STEP * max(1, round(side / 6 / ZOOM_STEP))


def zoomed_size(height: int, width: int) -> tuple[int, int]:
    """The zoomed view's input size (:func:`zoomed_side` of each)."""
    return zoomed_side(height), zoomed_side(width)


def view(x: torch.Tensor, mode: str, index: int) -> torch.Tensor:
    """View ``index`` (0: the image itself) of the NCHW batch ``x`` under ``mode``."""
    if index == 0:
        return x
    if mode == "flip-zoom":
        size = zoomed_size(int(x.shape[-2]), int(x.shape[-1]))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.flip(-1)


def views(x: torch.Tensor, mode: bool | str | None) -> list[torch.Tensor]:
    """Every view of the batch ``x`` a prediction under ``mode`` averages (the image first)."""
    mode = tta_mode(mode)
    return [view(x, mode, i) for i in range(view_count(mode))]


def view_count(mode: bool | str | None) -> int:
    """The views a prediction under ``mode`` averages (the image itself counts)."""
    return 2 if tta_mode(mode) else 1


def averaged(model: nn.Module, x: torch.Tensor, mode: bool | str | None) -> torch.Tensor:
    """The mean of ``model``'s outputs over the views of the batch ``x`` under ``mode``: the loop
    every prediction's forward pass runs (the unknown-score's taps run each view apart and average
    them alike: :func:`~visiontune.models.unknown.tapped_views`). The sum
    is in fp32, so under bf16 autocast the views' mean is not rounded at every step; one view: the
    output itself, in the model's own dtype (the callers cast: every one needs fp32)."""
    return mean_of_views([model(v) for v in views(x, mode)])


def mean_of_views(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The views' mean of ``outputs`` (one per view, the image first), summed in fp32; one view: the
    output itself, in its own dtype. :func:`averaged`'s arithmetic, for outputs computed apart."""
    if len(outputs) == 1:
        return outputs[0]
    total = outputs[0].float()
    for other in outputs[1:]:
        total = total + other.float()
    return total / len(outputs)


def view_cost(mode: bool | str | None, side: int = 224) -> float:
    """Forward passes a prediction under ``mode`` costs at an input of ``side`` px, in units of one
    pass at that size (the zoomed view's by its pixels)."""
    mode = tta_mode(mode)
    return {"": 1.0, "flip": 2.0, "flip-zoom": round(1.0 + (zoomed_side(side) / side) ** 2, 2)}[mode]


def takes_zoom(model: nn.Module, side: int) -> bool:
    """Whether ``model`` (built for ``side`` px) runs on the zoomed view (:func:`takes_side`)."""
    return takes_side(model, zoomed_side(side))


def takes_side(model: nn.Module, side: int) -> bool:
    """Whether ``model`` runs on ``side``-px inputs: a CNN takes any size, a ViT's position embeddings
    (or a Swin's windows, a LeViT's attention biases) only the size set at creation. One forward
    pass of a blank image, in eval mode (the module's mode is restored)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, side, side))
        return True
    except Exception:  # whatever the network raises for a size it does not take
        return False
    finally:
        model.train(was_training)
