"""Read weight files safely: safetensors, or ``torch.load(weights_only=True)`` for .pt/.pth.

A user's file is never unpickled with arbitrary code: a pickle that holds anything beyond
tensors and plain containers is refused with a message saying how to convert it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.errors import WeightsError

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def is_model_folder(weights: str) -> bool:
    """Whether ``--weights`` names a folder (a visiontune run or model) rather than a weights file."""
    return weights not in ("default", "none") and Path(weights).is_dir()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``path`` without executing code from it.

    Example:
        sd = read_state_dict("resnet18.safetensors")
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}. Pass --weights default|none|PATH to an existing file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"{path} is not a valid safetensors file: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"refused to load {path}: it contains pickled objects beyond tensors, which could run "
            f"code ({str(exc).splitlines()[0]}). Save only the state dict "
            "(torch.save(model.state_dict(), ...)) or convert it to .safetensors."
        ) from None
    except Exception as exc:
        raise WeightsError(f"cannot read weights from {path}: {exc}") from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {_strip_prefix(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, head: str | None = None) -> list[str]:
    """Load ``state`` into ``model``; only the classifier ``head`` may be left at its new init.

    Keys are matched by name; when no names match but the tensors line up one-to-one in order
    (a port from another implementation, as for the embedded EfficientNet-Lite0), by order.
    Returns the keys left at initialisation (the replaced head).
    """
    own = model.state_dict()

    def in_head(key: str) -> bool:
        return head is not None and key.startswith(head + ".")

    if not set(state) & set(own) and len(state) == len(own):
        pairs = zip(state.values(), own.items())
        if all(a.shape == b.shape or in_head(k) for a, (k, b) in pairs):
            state = dict(zip(own.keys(), state.values()))
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not in_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not in_head(k)]
    if missing or unexpected:
        raise WeightsError(
            f"weights from {source} do not fit this architecture: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Check that --model matches the file, or use --weights none."
        )
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
