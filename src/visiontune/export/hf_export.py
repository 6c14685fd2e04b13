"""timm / Hugging Face Hub layout: ``config.json`` + ``model.safetensors``.

The folder loads with plain timm and can be pushed to a hub unchanged::

    timm.create_model(arch, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=N))

(``num_classes`` in the overlay stops timm from discarding the trained head as "mismatched
with the 1000-class pretrained config"), or ``timm.create_model("local-dir:FOLDER")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .common import ExportError


def export_hf(model: nn.Module, meta: dict[str, Any], out: str | Path, **_: Any) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` in timm's hub layout.

    Only timm-sourced architectures have this layout; torchvision models raise ExportError.
    ``out`` is a folder; a path ending in ``.json``/``.safetensors`` means its parent.

    Example:
        >>> export_hf(model, meta, "hf-model/")  # doctest: +SKIP
        >>> timm.create_model("local-dir:hf-model")  # doctest: +SKIP
    """
    from timm.models._hub import save_config_for_hf

    arch = meta.get("architecture", {})
    if arch.get("source") != "timm":
        raise ExportError(f"--format hf needs a timm architecture; this model is {arch.get('source')}:"
                          f"{arch.get('name')} (use --format onnx or torchscript)")
    out = Path(out)
    if out.suffix in (".json", ".safetensors"):
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    pre = meta["preprocessing"]
    data_config = {"input_size": tuple(pre["input_size"]), "mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
                   "interpolation": pre.get("interpolation", "bilinear"), "crop_pct": float(pre.get("crop_pct", 0.875)),
                   "crop_mode": "center"}
    state = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # timm's own writer keeps the file identical to what push_to_hf_hub would produce
    save_config_for_hf(model, str(out / "config.json"), model_config={"label_names": list(meta["class_names"])},
                       data_config=data_config)
    return out / "model.safetensors"


@torch.inference_mode()
def hf_logits(path: str | Path, meta: dict[str, Any], batch: torch.Tensor, chunk: int = 32):
    """Logits from the exported folder loaded with timm alone (the parity reference for hf)."""
    import timm

    path = Path(path)
    folder = path.parent if path.is_file() else path
    n = int(meta["architecture"]["num_classes"])
    model = timm.create_model(meta["architecture"]["name"], pretrained=True, num_classes=n,
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=n))
    model.eval()
    return torch.cat([model(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]).numpy()
