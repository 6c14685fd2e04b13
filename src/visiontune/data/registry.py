"""The data layer's named choices (light: building the CLI parser never imports torchvision)."""

from __future__ import annotations

from ..core.registry import Registry

AUGMENTS = Registry.choices("augment", {"none": "the eval preprocessing", "light": "flip",
                                        "standard": "random resized crop + flip",
                                        "strong": "+ TrivialAugment, erasing",
                                        "crop-flip": "padded random crop + flip (small images: nothing zoomed away)"})
RESIZE = Registry.choices("resize_mode", crop="resize + centre crop", letterbox="keep the whole image, pad",
                          squash="resize to the input size, ignoring the aspect ratio")
