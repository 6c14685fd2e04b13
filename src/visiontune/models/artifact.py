"""Self-describing, pickle-free model artifacts: ``model.safetensors`` + ``model.json``.

``model.json`` holds everything needed to use the weights: architecture, class names,
preprocessing, metrics and package versions. Loading reads only these two files.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .factory import rebuild

FORMAT = "visiontune-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class ArtifactError(ValueError):
    """The path is not a usable visiontune model; the message says what is expected."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("visiontune", "torch", "torchvision", "timm", "lightning", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_model(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` atomically into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model.", suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp, metadata={"format": FORMAT})
    os.replace(tmp, directory / WEIGHTS_FILE)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "versions": package_versions(),
    }
    atomic_write_text(directory / META_FILE, json.dumps(full, indent=2) + "\n")
    return directory


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a run dir, a ``model/`` dir or a ``model.json`` path; return the model dir."""
    path = Path(path)
    if path.is_file() and path.name in (META_FILE, WEIGHTS_FILE):
        path = path.parent
    for candidate in (path, path / "model"):
        if (candidate / META_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ArtifactError(
        f"no visiontune model at {path}: expected {META_FILE} + {WEIGHTS_FILE} in it or in {path}/model "
        "(a run dir from `visiontune train`)."
    )


def read_meta(model_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((model_dir / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{model_dir / META_FILE} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{model_dir / META_FILE} is not a visiontune model description")
    for key in ("architecture", "class_names", "preprocessing"):
        if key not in meta:
            raise ArtifactError(f"{model_dir / META_FILE} lacks {key!r}")
    return meta


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from ``model.json`` and load ``model.safetensors`` (strict)."""
    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    model = rebuild(meta["architecture"])
    try:
        state = load_file(str(model_dir / WEIGHTS_FILE), device="cpu")
    except Exception as exc:
        raise ArtifactError(f"{model_dir / WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    model.load_state_dict(state, strict=True)
    model.eval()
    meta["model_dir"] = str(model_dir)
    return model, meta
