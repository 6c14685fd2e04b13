"""Layer shapes of a structurally pruned network, stored in model.json instead of a pickle.

:func:`layer_shapes` records the channel-defining attributes of every conv / norm / linear
layer; :func:`apply_shapes` shrinks a freshly rebuilt network to them (empty tensors of the
saved shapes), after which the weights load strictly. No code or pickled module is ever
stored, and a wrong shape fails the strict load instead of running silently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ArtifactError

# attributes that define a layer's channel counts, per layer type
SHAPE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
    nn.LayerNorm: ("normalized_shape",),
}


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


def apply_shapes(model: nn.Module, shapes: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """Shrink ``model``'s layers to ``shapes`` and its tensors to the shapes in ``state``.

    Only layers of the original architecture and their known attributes may change, and never
    grow: a crafted card cannot make loading allocate more than the original network.
    """
    if not isinstance(shapes, dict):
        raise ArtifactError("pruned.shapes must be a JSON object")
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        module = modules.get(name)
        kind = _kind(module) if module is not None else None
        if kind is None or not isinstance(attrs, dict) or not set(attrs) <= set(SHAPE_ATTRS[kind]):
            raise ArtifactError(f"pruned.shapes: {name!r} is not a prunable layer of this architecture")
        for attr, value in attrs.items():
            value = tuple(value) if isinstance(value, list) else value
            current = getattr(module, attr)
            if not _fits(value, current):
                raise ArtifactError(f"pruned.shapes: {name}.{attr}={value!r} does not fit the architecture "
                                    f"({current!r})")
            setattr(module, attr, value)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in state.items():
        current = params.get(key)
        if current is None:
            continue  # the strict load names it
        if current.shape != tensor.shape:
            if tensor.dim() != current.dim() or any(a > b for a, b in zip(tensor.shape, current.shape)):
                raise ArtifactError(f"pruned weights: {key} has shape {list(tensor.shape)}, larger than the "
                                    f"architecture's {list(current.shape)}")
            owner_name, _, leaf = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            empty = torch.empty(tensor.shape, dtype=current.dtype)
            setattr(owner, leaf, nn.Parameter(empty, current.requires_grad) if isinstance(current, nn.Parameter)
                    else empty)
    return model


def _fits(value: Any, current: Any) -> bool:
    if isinstance(current, tuple):
        return (isinstance(value, tuple) and len(value) == len(current)
                and all(_fits(v, c) for v, c in zip(value, current)))
    return (isinstance(value, int) and not isinstance(value, bool) and isinstance(current, int)
            and 1 <= value <= current)
