"""Shared pieces of every export: the deploy wrapper, sample images and the parity check.

Every exported graph wraps the trained network in :class:`DeployWrapper`, whose input is a
float32 NCHW batch *already normalised* with the model's mean/std at the model's input size
(exactly what :func:`visiontune.data.transforms.eval_transform` produces) and whose outputs are
``logits`` and ``probabilities`` (softmax of logits / temperature). Keeping the softmax and the
calibration temperature inside the graph is what makes an exported model agree with the
trained one: clients only have to reproduce the (documented, stored) resize/crop/normalise step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.image import ImageDecodeError, load_image
from ..data.transforms import draft_size, eval_transform

# Thresholds from issue 5: an export that disagrees more than this is refused.
MIN_AGREEMENT = 0.995
MAX_LOGIT_DIFF = 1e-3
INPUT_DOC = ("float32 NCHW [batch, 3, H, W] at the model's input size, RGB, scaled to 0..1 then "
             "normalised with the stored mean/std (resize shorter side to int(size/crop_pct), centre crop)")


class ExportError(ValueError):
    """An export, exported file or compression result cannot be used; the message says why."""


class DeployWrapper(nn.Module):
    """Network + temperature-scaled softmax: ``x -> (logits, probabilities)``.

    Example:
        >>> wrapped = DeployWrapper(model, temperature=1.0)  # doctest: +SKIP
        >>> logits, probs = wrapped(torch.zeros(1, 3, 224, 224))  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        # a buffer (not a Python float) so the value is visible as a constant in the graph
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def temperature_of(meta: dict[str, Any]) -> float:
    """Calibration temperature from model.json (1.0 when the model was never calibrated)."""
    return float((meta.get("calibration") or {}).get("temperature", 1.0))


def input_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    channels, height, width = (int(v) for v in meta["preprocessing"]["input_size"])
    return channels, height, width


def export_meta(meta: dict[str, Any], fmt: str, file_name: str, **extra: Any) -> dict[str, Any]:
    """model.json content for an exported file: the source meta plus an ``export`` section."""
    from .. import __version__

    out = {k: v for k, v in meta.items() if k != "model_dir"}
    out["export"] = {"format": fmt, "file": file_name, "input": INPUT_DOC, "outputs": ["logits", "probabilities"],
                     "temperature": temperature_of(meta), "visiontune_version": __version__, **extra}
    return out


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def resolve_data_path(meta: dict[str, Any]) -> Path | None:
    """The training data recorded in model.json, if it still exists (relative paths: cwd, then run dir)."""
    data = (meta.get("training") or {}).get("data")
    if not data:
        return None
    candidates = [Path(data)]
    if "model_dir" in meta and not Path(data).is_absolute():
        candidates.append(Path(meta["model_dir"]).parent / data)
    return next((p for p in candidates if p.exists()), None)


def labelled_samples(meta: dict[str, Any], data: str | os.PathLike | None = None,
                     split: str = "val") -> list[tuple[str, int]]:
    """Labelled images for parity/accuracy: ``data`` (evaluation layout) or the model's own split.

    Without ``data`` the run's own ``splits/<split>.csv`` is read, so ``val`` is exactly the
    held-out set the model never trained on (whatever ``--val``/``--val-fraction`` training used).
    A model folder moved away from its run re-splits the recorded training data with the
    recorded seed and fraction instead.
    """
    from ..data.scan import discover, discover_eval
    from ..evaluation.calibration import read_split_csv

    if data is not None:
        return discover_eval(data, list(meta["class_names"]))[0]
    if "model_dir" in meta:
        split_csv = Path(meta["model_dir"]).parent / "splits" / f"{split}.csv"
        if split_csv.is_file():
            return read_split_csv(split_csv, list(meta["class_names"]))
    source = resolve_data_path(meta)
    if source is None:
        return []
    training = meta.get("training") or {}
    splits = discover(source, training.get("val"), float(training.get("val_fraction", 0.2)),
                      seed=int(training.get("seed", 0)), class_names=list(meta["class_names"]))
    return list(getattr(splits, split)) or list(splits.val)


def generated_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic synthetic photos (noise + shapes) for parity when no real data is at hand."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        arr[y0:y0 + size // 2, x0:x0 + size // 2] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(arr))
    return images


def preprocess(inputs: Sequence[str | Image.Image], pre: dict[str, Any]) -> torch.Tensor:
    """Decode and transform images exactly as prediction does; unreadable ones are dropped."""
    transform, draft = eval_transform(pre), draft_size(pre)
    tensors = []
    for item in inputs:
        try:
            tensors.append(transform(load_image(item, draft)))
        except (ImageDecodeError, OSError):
            continue
    if not tensors:
        raise ExportError("no readable images to check the export with")
    return torch.stack(tensors)


def parity_batch(meta: dict[str, Any], data: str | os.PathLike | None = None,
                 limit: int = 64) -> tuple[torch.Tensor, str]:
    """A preprocessed batch of validation images (or generated ones) and where it came from."""
    samples = labelled_samples(meta, data)
    if samples:
        step = max(1, len(samples) // limit)  # spread over classes rather than the first folder only
        paths = [p for p, _ in samples[::step][:limit]]
        return preprocess(paths, meta["preprocessing"]), f"{len(paths)} validation images"
    _, height, width = input_shape(meta)
    images = generated_images(min(limit, 32), max(height, width) * 2)
    return preprocess(images, meta["preprocessing"]), f"{len(images)} generated images"


@torch.inference_mode()
def eager_logits(model: nn.Module, batch: torch.Tensor, chunk: int = 32) -> np.ndarray:
    """fp32 PyTorch logits, the reference every export is compared with."""
    model = model.eval().float()
    return torch.cat([model(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]).numpy()


def compare_logits(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and max |logit difference| between two [N, C] arrays."""
    agreement = float(np.mean(reference.argmax(1) == other.argmax(1)))
    return {"top1_agreement": agreement, "max_abs_logit_diff": float(np.max(np.abs(reference - other))),
            "num_images": int(len(reference))}


def parity_problems(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                    max_diff: float | None = MAX_LOGIT_DIFF) -> list[str]:
    """What makes an export disagree with eager beyond the thresholds (empty: it passes)."""
    problems = []
    if report["top1_agreement"] < min_agreement:
        problems.append(f"top-1 agreement {report['top1_agreement']:.2%} < {min_agreement:.1%}")
    if max_diff is not None and report["max_abs_logit_diff"] > max_diff:
        problems.append(f"max |logit diff| {report['max_abs_logit_diff']:.2e} > {max_diff:.0e}")
    return problems


def check_parity(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                 max_diff: float | None = MAX_LOGIT_DIFF) -> None:
    """Raise :class:`ExportError` when an export disagrees with eager beyond the thresholds."""
    problems = parity_problems(report, min_agreement, max_diff)
    if problems:
        raise ExportError(f"export parity check failed vs eager PyTorch on {report.get('source', 'images')}: "
                          + "; ".join(problems))


def file_size_mb(path: str | os.PathLike) -> float:
    path = Path(path)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total / 1e6
