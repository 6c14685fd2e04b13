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

from ..core.errors import ExportError
from ..core.safe_io import atomic_path, atomic_write_text
from ..models.card import ModelCard
from ..models.lowres import is_lowres
from ..models.readme import README_FILE, model_readme
from .exporter import Format


def export_hf(model: nn.Module, card: ModelCard, out: str | Path, **_: Any) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` in timm's hub layout.

    Only timm-sourced architectures have this layout; torchvision models raise ExportError.
    ``out`` is a folder; a path ending in ``.json``/``.safetensors`` means its parent.

    Example:
        export_hf(model, card, "hf-model/")
        timm.create_model("local-dir:hf-model")
    """
    from timm.models._hub import save_config_for_hf  # lazy: only this format needs timm's hub writer

    arch = card.architecture
    if arch is None or arch.source != "timm":
        raise ExportError(f"--format hf needs a timm architecture; this model is "
                          f"{arch.source + ':' + arch.name if arch else 'of unknown origin'} "
                          "(use --format onnx or torchscript)")
    if is_lowres(arch.name):  # registered in timm by visiontune only: plain timm could not build it
        raise ExportError(f"--format hf writes a folder plain timm loads; {arch.name} is visiontune's own network "
                          "(not in timm). Use --format onnx, openvino or torchscript")
    out = Path(out)
    if out.suffix in (".json", ".safetensors"):
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    pre = card.preprocessing
    data_config = {"input_size": pre.input_size, "mean": pre.mean, "std": pre.std, "interpolation": pre.interpolation,
                   "crop_pct": pre.crop_pct, "crop_mode": "center"}
    state = {k: v.detach().cpu().float().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:  # never through a link planted in the folder
        save_file(state, str(tmp), metadata={"format": "pt"})
    # timm's own writer keeps the file identical to what push_to_hf_hub would produce
    # a multi-label model adds transformers' name for sigmoid outputs, with what decides each label
    model_config: dict = {"label_names": list(card.class_names),
                          **card.task.hf_config(card.thresholds, card.temperature)}
    with atomic_path(out / "config.json") as tmp:  # timm's writer, into a fresh temp file of ours
        save_config_for_hf(model, str(tmp), model_config=model_config, data_config=data_config)
    atomic_write_text(out / README_FILE, model_readme(card, file_format="hf"))  # the Hub's model card
    return out / "model.safetensors"


@torch.inference_mode()
def hf_logits(path: str | Path, card: ModelCard, batch: torch.Tensor, chunk: int = 32):
    """Logits from the exported folder loaded with timm alone (the parity reference for hf)."""
    import timm  # lazy: timm loads only for this parity check

    path = Path(path)
    folder = path.parent if path.is_file() else path
    n = card.num_classes
    model = timm.create_model(card.architecture.name, pretrained=True, num_classes=n,
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=n))
    model.eval()
    return torch.cat([model(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]).numpy()


FORMAT = Format(export_hf, hf_logits, "model.safetensors")
