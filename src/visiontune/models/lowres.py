"""Compact CNNs trained from scratch at the images' own low resolution (CIFAR-sized photos).

For 32-px images an ImageNet backbone must be fine-tuned at 2-3x upscaled inputs to be
accurate, and its depthwise convolutions run memory-bound on a CPU. A small VGG-style network
built for the resolution does better per second there: measured on a 2-core AVX512-BF16 CPU
(bench/RESULTS.md), ``lowres_cnn`` trains ~450-550 CIFAR-10 images/s in bf16, against ~125 for
EfficientNet-Lite0 fine-tuned at 96 px; per epoch it learns less (0.871 on held-out CIFAR-10 JPEGs in
15 minutes, 8.4 epochs, where the fine-tune reaches 0.895). The design follows published fast-CIFAR
recipes (Page's ResNet-9, Jordan's airbench; the code is ours):

- a first 2x2 convolution fixed to *whiten* the input's patches (the eigenvectors of their
  covariance, scaled by 1/sqrt(eigenvalue), and their negatives), computed from training images
  before training (:meth:`LowResCNN.fit_whitening`) and kept in a buffer (it is not trained);
- three blocks of conv 3x3 - max-pool - BatchNorm - GELU - conv 3x3 - BatchNorm - GELU;
- global max-pooling and a linear classifier whose logits are scaled down (a temperature that
  keeps the early loss smooth at the high learning rates these recipes use).

The networks are registered in timm's model registry under :data:`LOWRES_MODELS`, so
``--model lowres_cnn``, ``model.json`` and every export treat them like any timm model. They have
no pretrained weights: they train with ``--strategy scratch`` (implied by ``--model lowres_cnn``, with
the recipe of :func:`~visiontune.training.lowres_plan.network_recipe`), which the time-budget planner
chooses for them where their measured speed buys more accuracy than fine-tuning
(:mod:`visiontune.training.lowres_plan`).

Example:
    >>> import torch
    >>> net = LowResCNN(num_classes=3, widths=(8, 16, 16))
    >>> net.fit_whitening(torch.randn(64, 3, 32, 32))
    >>> tuple(net(torch.randn(2, 3, 32, 32)).shape)
    (2, 3)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..core.errors import ModelError

# name -> (block widths, what it is for): the one list every lookup and message reads
LOWRES_MODELS = {
    "lowres_cnn": ((64, 256, 256), "compact CNN for images of ~32 px, from scratch (airbench94's shape)"),
    "lowres_cnn_wide": ((128, 384, 384), "wider: ~2.5x the compute per image, for budgets of an hour and more"),
}
WHITEN_PATCH = 2        # side of the patches the first layer whitens
WHITEN_EPS = 5e-4       # added to the patch covariance's eigenvalues: near-constant directions stay bounded
LOGIT_SCALE = 1 / 9     # temperature of the classifier's logits (airbench's value)
BN_MOMENTUM = 0.4       # running statistics follow a few dozen steps: short runs end with current ones
PRETRAINED_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                  "interpolation": "bilinear", "crop_pct": 1.0, "classifier": "head", "num_classes": 10,
                  "first_conv": "whiten_bias"}


class ScaledLinear(nn.Linear):
    """A linear layer whose outputs are multiplied by :data:`LOGIT_SCALE`: the scale is part of the
    classifier module, so every path that calls the classifier on features (cached features, the
    unknown-score, exports) gets the logits the whole network gives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * LOGIT_SCALE


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                         nn.BatchNorm2d(cout, momentum=BN_MOMENTUM), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout, momentum=BN_MOMENTUM), nn.GELU())


class LowResCNN(nn.Module):
    """Whitening layer, three conv blocks, max-pool, linear head (see the module's docstring).

    Args:
        num_classes: outputs of the classifier (``head``).
        widths: channels of the three blocks.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        whiten_out = 2 * 3 * WHITEN_PATCH ** 2
        self.register_buffer("whiten_weight", torch.zeros(whiten_out, 3, WHITEN_PATCH, WHITEN_PATCH))
        self.whiten_bias = nn.Parameter(torch.zeros(whiten_out))
        self.blocks = nn.Sequential(_block(whiten_out, widths[0]), _block(widths[0], widths[1]),
                                    _block(widths[1], widths[2]))
        self.num_features, self.num_classes = widths[2], num_classes
        self.head = ScaledLinear(widths[2], num_classes)
        for module in self.blocks.modules():
            if isinstance(module, nn.Conv2d):  # start each conv near identity on its first channels
                w = module.weight.data
                nn.init.dirac_(w[: min(w.size(0), w.size(1))])
        self.pretrained_cfg = dict(PRETRAINED_CFG, num_classes=num_classes)
        self.default_cfg = self.pretrained_cfg

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor) -> None:
        """Set the first layer from normalised training images ``[N, 3, H, W]`` (a few thousand suffice)."""
        patches = images.float().unfold(2, WHITEN_PATCH, 1).unfold(3, WHITEN_PATCH, 1)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * WHITEN_PATCH ** 2).double()
        patches = patches - patches.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + WHITEN_EPS)).T
        filters = filters.reshape(-1, 3, WHITEN_PATCH, WHITEN_PATCH).float()
        self.whiten_weight.copy_(torch.cat([filters, -filters]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(F.conv2d(x, self.whiten_weight, self.whiten_bias))
        return F.adaptive_max_pool2d(self.blocks(x), 1).flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head = ScaledLinear(self.num_features, num_classes)
        self.num_classes = num_classes

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups (stem, then one per block) for progressive unfreezing."""
        return {"stem": r"^whiten_bias", "blocks": r"^blocks\.(\d+)"}


def _factory(name: str):
    widths = LOWRES_MODELS[name][0]

    def create(pretrained: bool = False, num_classes: int = 10, **_: object) -> LowResCNN:
        if pretrained:
            raise ModelError(f"{name} has no pretrained weights: it trains from scratch (--strategy scratch, "
                             "or --weights none)")
        return LowResCNN(num_classes, widths)

    create.__name__ = name
    create.__module__ = __name__
    return create


def register() -> None:
    """Add :data:`LOWRES_MODELS` to timm's model registry (once; ``timm.create_model`` then builds them)."""
    import timm
    from timm.models import register_model

    for name in LOWRES_MODELS:
        if not timm.is_model(name):
            register_model(_factory(name))


def is_lowres(name: str) -> bool:
    """Whether ``name`` (a ``--model`` value) is one of :data:`LOWRES_MODELS`."""
    return name.removeprefix("timm:") in LOWRES_MODELS
