"""Self-describing, pickle-free model artifacts: ``model.safetensors`` + ``model.json``.

``model.json`` is the :class:`~visiontune.models.card.ModelCard`. Loading reads only these two
files: the card is validated, the classifier's size is checked against the weights' header
before the network is built, the architecture is rebuilt from the card (shrunk to its recorded
layer shapes when it was pruned), and the weights load strictly.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import ArtifactError
from ..core.layout import MODEL_DIR
from ..core.safe_io import atomic_path, atomic_write_text
from .card import FORMAT, ModelCard
from .factory import fit_input_size, rebuild
from .readme import README_FILE, model_readme
from .shapes import apply_shapes

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MAX_CARD_BYTES = 16 * 2**20


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("visiontune", "torch", "torchvision", "timm", "lightning", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_card(directory: str | os.PathLike, card: ModelCard) -> Path:
    """(Re)write ``model.json`` atomically, and the ``README.md`` model card generated from it;
    the weights are untouched."""
    path = Path(directory) / META_FILE
    atomic_write_text(path, json.dumps(card.to_dict(), indent=2) + "\n")
    atomic_write_text(Path(directory) / README_FILE, model_readme(card))
    return path


def save_model(directory: str | os.PathLike, model: nn.Module, card: ModelCard) -> Path:
    """Write ``model.safetensors`` and ``model.json`` atomically into ``directory``.

    ``created`` and ``versions`` are stamped here.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:  # a model folder may come from anyone: no link followed
        save_file(state, str(tmp), metadata={"format": FORMAT})
    stamped = card.replace(created=datetime.now(UTC).isoformat(timespec="seconds"),
                           versions=package_versions())
    write_card(directory, stamped)
    return directory


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Accept a run dir, a ``model/`` dir or a ``model.json`` path; return the model dir."""
    path = Path(path)
    if path.is_file() and path.name in (META_FILE, WEIGHTS_FILE):
        path = path.parent
    for candidate in (path, path / MODEL_DIR):
        if (candidate / META_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ArtifactError(
        f"no visiontune model at {path}: expected {META_FILE} + {WEIGHTS_FILE} in it or in {path}/{MODEL_DIR} "
        "(a run dir from `visiontune train`)."
    )


def read_json(path: Path) -> Any:
    """Parse a small JSON file that visiontune may not have written (size-bounded).

    Every way it can fail is an :class:`ArtifactError`: too large, unreadable (a folder, missing),
    not UTF-8, not JSON, nested too deep for the parser, or a number too long to convert.
    """
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise ArtifactError(f"{path} is larger than {MAX_CARD_BYTES // 2**20} MiB; not a model description")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ArtifactError(f"{path} is nested too deeply to be a model description") from None
    except ValueError as exc:  # JSONDecodeError, and integers beyond Python's 4300-digit conversion limit
        raise ArtifactError(f"{path} is not valid JSON: {str(exc)[:200]}") from None


def read_card(model_dir: str | os.PathLike) -> ModelCard:
    """The validated card of a model dir (``model_dir`` set)."""
    model_dir = Path(model_dir)
    card = ModelCard.from_dict(read_json(model_dir / META_FILE), str(model_dir / META_FILE))
    card.model_dir = model_dir
    return card


def check_weights(weights: Path, card: ModelCard) -> None:
    """The weights file fits the card's architecture, judged from its safetensors header alone
    (before a byte of tensor data is read, hashed or allocated).

    The classifier has as many rows as the card has classes; every tensor is one the architecture
    has; and they hold no more weights than the architecture's own (a pruned model's hold fewer),
    counted on a skeleton built on PyTorch's meta device (no memory).
    """
    key = f"{card.architecture.classifier}.weight"
    try:
        with safe_open(str(weights), framework="pt") as fh:  # also refuses a file its header does not cover
            shapes = {name: fh.get_slice(name).get_shape() for name in fh.keys()}
    except Exception as exc:
        raise ArtifactError(f"{weights} is not a valid safetensors file: {exc}") from None
    if key not in shapes:
        raise ArtifactError(f"{weights} has no {key!r} for the classifier named in {META_FILE}")
    rows = shapes[key][0] if shapes[key] else None
    if rows != card.num_classes:
        raise ArtifactError(f"{weights} has a {rows}-class classifier but {META_FILE} names "
                            f"{card.num_classes} classes; the two files do not belong together")
    with torch.device("meta"):
        expected = rebuild(card.architecture, (card.preprocessing.height, card.preprocessing.width)).state_dict()
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ArtifactError(f"{weights} does not fit the architecture in {META_FILE}: it holds tensors the "
                            f"architecture does not have ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''});"
                            " the two files do not belong together")
    declared = sum(math.prod(shape) for shape in shapes.values())
    allowed = sum(t.numel() for t in expected.values())
    if declared > allowed:
        raise ArtifactError(f"{weights} does not fit the architecture in {META_FILE}: it declares {declared:,} "
                            f"weights, more than the architecture's {allowed:,}; the two files do not belong together")


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ModelCard]:
    """Rebuild the network from ``model.json`` and load ``model.safetensors`` (strict).

    Example:
        model, card = load_model("runs/train-1")
        card.class_names
        # -> ['ants', 'bees']
    """
    model_dir = resolve_model_dir(path)
    card = read_card(model_dir)
    check_weights(model_dir / WEIGHTS_FILE, card)  # the header, before the network is allocated
    model = rebuild(card.architecture)
    load_weights(model, card)
    return model.eval(), card


def load_weights(model: nn.Module, card: ModelCard) -> None:
    """Load the weights of the model folder ``card`` was read from into ``model``, a network of the
    card's architecture (as :func:`~visiontune.models.factory.rebuild` or ``build_model`` makes it),
    at the size it was trained at, strictly: every tensor, the classifier's too.

    The header is checked against the card before any tensor is read (:func:`check_weights`); a
    file that does not fit is an :class:`ArtifactError`, never a partial load.
    """
    if card.model_dir is None:
        raise ArtifactError("a model card read from no folder has no weights to load")
    weights = Path(card.model_dir) / WEIGHTS_FILE
    check_weights(weights, card)
    fit_input_size(model, card.preprocessing.height, card.preprocessing.width)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:
        raise ArtifactError(f"{weights} is not a valid safetensors file: {exc}") from None
    if card.pruned is not None:
        apply_shapes(model, card.pruned.get("shapes"), state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{weights} does not fit the architecture in {META_FILE} ({first[:300]})") from None
