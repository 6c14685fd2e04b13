"""TorchScript export: ``torch.jit.trace`` of the deploy wrapper, metadata in ``_extra_files``.

The traced module has the same contract as the ONNX graph (normalised float32 NCHW in,
``(logits, probabilities)`` out). ``visiontune.json`` inside the archive carries class names,
preprocessing and temperature; ``torch.jit.load`` never unpickles arbitrary Python objects.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ExportError
from ..core.safe_io import atomic_path
from ..models.card import ModelCard
from .deploy import deploy_wrapper, graph_metadata, input_shape
from .exporter import Format

EXTRA_FILE = "visiontune.json"


def export_torchscript(model: nn.Module, card: ModelCard, out: str | Path, **_: Any) -> Path:
    """Trace ``model`` (wrapped with softmax + temperature) and save it to ``out`` (``.pt``).

    Extra keyword arguments (``opset``, ``dynamic_batch``) are accepted and ignored: a traced
    convolutional network already accepts any batch size.

    Example:
        export_torchscript(model, card, "model.pt")
        torch.jit.load("model.pt")(x)[1].sum(1)  # probabilities
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = deploy_wrapper(model.eval().float().cpu(), card)
    example = torch.zeros(2, *input_shape(card))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit deprecation: still the portable format here
            traced = torch.jit.trace(wrapper, example, check_trace=False)
    except Exception as exc:
        raise ExportError(f"TorchScript trace failed: {type(exc).__name__}: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with atomic_path(out) as tmp:  # never through a link planted in the output folder
            torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(graph_metadata(card))})
    return out


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """Load an exported TorchScript file and its visiontune metadata."""
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ExportError(f"{path} is not a usable TorchScript model ({type(exc).__name__})") from None
    return module.eval(), json.loads(extra[EXTRA_FILE] or "{}")


@torch.inference_mode()
def torchscript_logits(path: str | Path, batch: torch.Tensor, chunk: int = 32):
    module, _ = load_torchscript(path)
    return torch.cat([module(batch[i:i + chunk])[0] for i in range(0, len(batch), chunk)]).numpy()


FORMAT = Format(export_torchscript, lambda path, card, batch: torchscript_logits(path, batch), "model.pt")
