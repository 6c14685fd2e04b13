"""Structured channel pruning with ``torch-pruning`` and a short recovery fine-tune.

Saving a pruned network, pickle-free: the weights stay a plain ``model.safetensors`` and
``model.json`` gains ``"pruned": {"shapes": {module: {in_channels, out_channels, groups, ...}}}``.
:func:`load_pruned` rebuilds the *original* architecture from model.json (no download), shrinks
each listed layer to its recorded channel counts (empty tensors of the saved shapes) and then
loads the weights strictly. No code or pickled module is ever stored, and a wrong shape fails
the strict load instead of running silently.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..models.artifact import WEIGHTS_FILE, read_meta, resolve_model_dir, save_model
from ..models.factory import rebuild
from .common import ExportError, input_shape

# attributes that define a layer's channel counts, per layer type
SHAPE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
    nn.LayerNorm: ("normalized_shape",),
}
ARTIFACT_KEYS = ("format", "format_version", "created", "versions", "model_dir")


def _kind(module: nn.Module) -> type | None:
    return next((t for t in SHAPE_ATTRS if isinstance(module, t)), None)


def layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Channel-defining attributes of every conv / norm / linear layer (JSON-safe)."""
    shapes = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            shapes[name] = {a: list(v) if isinstance(v := getattr(module, a), tuple) else v for a in SHAPE_ATTRS[kind]}
    return shapes


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]) -> nn.Module:
    """Shrink ``model``'s layers to ``shapes`` and its tensors to the shapes in ``state``."""
    for name, attrs in shapes.items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, leaf, None)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            empty = torch.empty(tensor.shape, dtype=current.dtype)
            setattr(owner, leaf, nn.Parameter(empty, current.requires_grad) if isinstance(current, nn.Parameter)
                    else empty)
    return model


def is_pruned(path: str | os.PathLike) -> bool:
    try:
        return "pruned" in read_meta(resolve_model_dir(path))
    except ValueError:
        return False


def load_pruned(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model saved by :func:`save_pruned` (pickle-free)."""
    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    if "pruned" not in meta:
        raise ExportError(f"{model_dir} is not a pruned model")
    state = load_file(str(model_dir / WEIGHTS_FILE), device="cpu")
    model = apply_shapes(rebuild(meta["architecture"]), meta["pruned"]["shapes"], state)
    model.load_state_dict(state, strict=True)
    meta["model_dir"] = str(model_dir)
    return model.eval(), meta


def save_pruned(directory: str | os.PathLike, model: nn.Module, meta: dict[str, Any],
                info: dict[str, Any]) -> Path:
    """Write a pruned model as model.safetensors + model.json with its layer shapes."""
    clean = {k: v for k, v in meta.items() if k not in ARTIFACT_KEYS}
    clean["pruned"] = {**info, "shapes": layer_shapes(model)}
    return save_model(directory, model, clean)


def count_macs(model: nn.Module, meta: dict[str, Any]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass at the model's input size."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), torch.zeros(1, *input_shape(meta)))
    return int(macs), int(params)


def prune_channels(model: nn.Module, meta: dict[str, Any], ratio: float) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer (L2 magnitude), in place.

    torch-pruning's dependency graph keeps coupled layers consistent (residual adds, BN,
    depthwise convs whose in/out channels are tied via groups); the classifier's outputs are
    never pruned so the class count is unchanged.

    Example:
        >>> prune_channels(model, meta, 0.3)  # doctest: +SKIP
    """
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise ExportError(f"--prune RATIO must be in (0, 1), got {ratio}")
    head = model.get_submodule(meta["architecture"]["head"])
    model.eval()
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, *input_shape(meta)),
                                  importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[head], round_to=8)  # multiples of 8 keep SIMD kernels efficient
    pruner.step()
    return model


def finetune(model: nn.Module, meta: dict[str, Any], samples: list[tuple[str, int]], epochs: int,
             batch_size: int = 32, lr: float = 1e-3, workers: int = 0, log=print) -> nn.Module:
    """Short recovery fine-tune of all layers (AdamW, cosine LR, light augmentation)."""
    from torch.utils.data import DataLoader

    from ..data.dataset import ImageListDataset
    from ..data.transforms import draft_size, train_transform

    if epochs <= 0 or not samples:
        return model
    pre = meta["preprocessing"]
    loader = DataLoader(ImageListDataset(samples, train_transform(pre, "light"), draft_size(pre)),
                        batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=len(samples) > batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(loader)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.detach().item() * len(labels), seen + len(labels)
        log(f"recovery epoch {epoch + 1}/{epochs}  loss {total / max(seen, 1):.4f}")
    return model.eval()
