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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.errors import ExportError, ImageDecodeError
from ..core.layout import RunLayout
from ..core.safe_io import atomic_write_text
from ..core.version import __version__
from ..data.image import load_image
from ..data.preprocess import Preprocessing
from ..data.scan import discover, discover_eval, read_split_csv
from ..data.transforms import eval_transform
from ..evaluation.multilabel import decisions
from ..inference.rows import probabilities
from ..inference.runners import forward_logits
from ..models.card import ModelCard

# Thresholds from issue 5: an export that disagrees more than this is refused.
MIN_AGREEMENT = 0.995
# the largest |logit difference| as a share of the largest |logit| (at least 1): the same test on
# every model. Random-init Inception v3 has logits of 7e7 whose float32 exports differ by 2e2
# (3e-6 of the scale, rounding), while a real mismatch differs by a sizeable share of the scale.
MAX_LOGIT_DIFF = 2e-4
INPUT_DOC = ("float32 NCHW [batch, 3, H, W] at the model's input size, RGB, scaled to 0..1 then "
             "normalised with the stored mean/std (resize shorter side to int(size/crop_pct), centre crop)")
INPUT_DOC_UINT8 = ("uint8 NHWC [batch, H, W, 3] RGB at the model's input size (resize shorter side to "
                   "int(size/crop_pct), centre crop); the graph scales and normalises it")
INPUT_DTYPES = ("float32", "uint8")


def input_doc(input_dtype: str = "float32") -> str:
    """What an exported graph's input is, for its metadata and its ``model.json``."""
    return INPUT_DOC_UINT8 if input_dtype == "uint8" else INPUT_DOC


class DeployWrapper(nn.Module):
    """Network + temperature-scaled softmax (a sigmoid per label for a multi-label model):
    ``x -> (logits, probabilities)``.

    Example:
        wrapped = DeployWrapper(model, temperature=1.0)
        logits, probs = wrapped(torch.zeros(1, 3, 224, 224))
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, tta: bool = False, multi_label: bool = False,
                 normalise: Preprocessing | None = None):
        super().__init__()
        self.model = model
        self.tta = tta
        self.multi_label = multi_label
        # a buffer (not a Python float) so the value is visible as a constant in the graph
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        # ``normalise``: the input is uint8 NHWC and the graph does what data.preprocess.normalize does
        self.uint8_input = normalise is not None
        if normalise is not None:
            self.register_buffer("mean", torch.tensor(normalise.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(normalise.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uint8_input:  # the same float32 steps as normalize(): x * (1/255), then (x - mean) / std
            x = x.permute(0, 3, 1, 2).float() * torch.tensor(1.0 / 255.0, dtype=torch.float32)
            x = (x - self.mean) / self.std
        logits = forward_logits(self.model, x, self.tta)
        if self.multi_label:
            return logits, torch.sigmoid(logits / self.temperature)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def input_shape(card: ModelCard) -> tuple[int, int, int]:
    return card.preprocessing.input_size


def export_card(card: ModelCard, fmt: str, file_name: str, **extra: Any) -> ModelCard:
    """The card of an exported file: the source card plus an ``export`` section."""
    return card.replace(export={"format": fmt, "file": file_name, "input": input_doc(extra.get("input_dtype")),
                                "outputs": ["logits", "probabilities"], "temperature": card.temperature,
                                "probabilities": "sigmoid per label" if card.multi_label else "softmax",
                                "visiontune_version": __version__, **extra})


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def resolve_data_path(card: ModelCard) -> Path | None:
    """The training data the card records, only when it is this user's own run's, else None.

    A model folder from someone else names whatever path its author chose (``.``, ``~``...), and
    walking it would read and decode that tree. So the path is used only when the model folder
    still sits in the run folder that training recorded (``training.run_dir``, a real path no
    stranger can match), and it is a folder or CSV that exists and belongs to the current user
    (relative paths: cwd, then the run folder).
    """
    data = card.training.get("data")
    if not data or not isinstance(data, str) or card.model_dir is None:
        return None
    run = RunLayout.of_model_dir(card.model_dir).root
    if card.training.get("run_dir") != os.path.realpath(run):
        return None
    candidates = [Path(data)] if Path(data).is_absolute() else [Path(data), run / data]
    for path in candidates:
        try:
            owned = path.stat().st_uid == os.getuid() if hasattr(os, "getuid") else True
        except OSError:
            continue
        if owned and (path.is_dir() or (path.is_file() and path.suffix.lower() == ".csv")):
            return path
    return None


def labelled_samples(card: ModelCard, data: str | os.PathLike | None = None,
                     split: str = "val") -> list[tuple[str, int]]:
    """Labelled images for parity/accuracy: ``data`` (evaluation layout) or the model's own split.

    Without ``data`` the run's own ``splits/<split>.csv`` is read, so ``val`` is exactly the
    held-out set the model never trained on (whatever ``--val``/``--val-fraction`` training used).
    A model folder without split CSVs, still in the run folder training wrote, re-splits the
    recorded training data with the recorded seed and fraction instead (:func:`resolve_data_path`);
    any other gives ``[]`` (callers ask for ``--data``).
    """
    if data is not None:
        return discover_eval(data, card.class_names, card.task, str(card.training.get("label_delim", " ")))[0]
    if card.model_dir is not None:
        split_csv = RunLayout.of_model_dir(card.model_dir).split_csv(split)
        if split_csv.is_file():
            return read_split_csv(split_csv, card.class_names)
    source = resolve_data_path(card)
    if source is None:
        return []
    training = card.training
    splits = discover(source, training.get("val"), float(training.get("val_fraction", 0.2)),
                      seed=int(training.get("seed", 0)), class_names=card.class_names, task=card.task,
                      label_delim=str(training.get("label_delim", " ")))
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


def preprocess(inputs: Sequence[str | Image.Image], pre: Preprocessing) -> torch.Tensor:
    """Decode and transform images exactly as prediction does; unreadable ones are dropped."""
    transform, draft = eval_transform(pre), pre.draft_size()
    tensors = []
    for item in inputs:
        try:
            tensors.append(transform(load_image(item, draft)))
        except ImageDecodeError:
            continue
    if not tensors:
        raise ExportError("no readable images to check the export with")
    return torch.stack(tensors)


def parity_batch(card: ModelCard, data: str | os.PathLike | None = None,
                 limit: int = 64) -> tuple[torch.Tensor, str]:
    """A preprocessed batch of validation images (or generated ones) and where it came from."""
    samples = labelled_samples(card, data)
    if samples:
        step = max(1, len(samples) // limit)  # spread over classes rather than the first folder only
        paths = [p for p, _ in samples[::step][:limit]]
        return preprocess(paths, card.preprocessing), f"{len(paths)} validation images"
    pre = card.preprocessing
    images = generated_images(min(limit, 32), max(pre.height, pre.width) * 2)
    return preprocess(images, pre), f"{len(images)} generated images"


@torch.inference_mode()
def eager_logits(model: nn.Module, batch: torch.Tensor, chunk: int = 32, tta: bool = False) -> np.ndarray:
    """fp32 PyTorch logits, the reference every export is compared with."""
    model = model.eval().float()
    return torch.cat([forward_logits(model, batch[i:i + chunk], tta) for i in range(0, len(batch), chunk)]).numpy()


def compare_logits(reference: np.ndarray, other: np.ndarray, card: ModelCard | None = None) -> dict[str, float]:
    """Top-1 agreement and max |logit difference| between two [N, C] arrays, absolute and relative
    to the reference's largest |logit| (at least 1); for a multi-label ``card``, the agreement of
    every per-label decision at its threshold (``label_agreement``)."""
    largest = float(np.max(np.abs(reference - other)))
    scale = max(float(np.max(np.abs(reference))), 1.0)
    diff = {"max_abs_logit_diff": largest, "max_rel_logit_diff": largest / scale, "num_images": int(len(reference))}
    if card is not None and card.multi_label:  # decided exactly as prediction decides them
        def decide(logits: np.ndarray) -> torch.Tensor:
            probs = probabilities(torch.from_numpy(np.asarray(logits)), card.temperature, multi_label=True)
            return decisions(probs, card.thresholds)

        return {"label_agreement": float((decide(reference) == decide(other)).float().mean()), **diff}
    return {"top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))), **diff}


@dataclass(frozen=True)
class ValScore:
    """What compress measures and guards: val accuracy, or a multi-label model's val macro mAP,
    and the agreement of a variant's decisions with eager's (top-1, or every per-label decision)."""

    card: ModelCard

    @property
    def multi(self) -> bool:
        return self.card.multi_label

    @property
    def key(self) -> str:
        return "val_map" if self.multi else "val_accuracy"

    @property
    def change(self) -> str:
        return "map_change_pts" if self.multi else "accuracy_change_pts"

    @property
    def agreement(self) -> str:
        return "label_agreement" if self.multi else "top1_agreement"

    @property
    def name(self) -> str:
        return "macro mAP" if self.multi else "accuracy"

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        if not self.multi:
            return float(np.mean(logits.argmax(1) == labels))
        from torchmetrics.functional.classification import multilabel_average_precision  # lazy: multi only

        probs = probabilities(torch.from_numpy(np.asarray(logits)), self.card.temperature, multi_label=True)
        return float(multilabel_average_precision(probs, torch.from_numpy(np.asarray(labels)).int(),
                                                  num_labels=probs.shape[1], average="macro"))

    def agree(self, logits: np.ndarray, reference: np.ndarray) -> float:
        return compare_logits(reference, logits, self.card)[self.agreement]


def parity_problems(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                    max_diff: float | None = MAX_LOGIT_DIFF) -> list[str]:
    """What makes an export disagree with eager beyond the thresholds (empty: it passes)."""
    problems = []
    kind = "top1_agreement" if "top1_agreement" in report else "label_agreement"
    if report[kind] < min_agreement:
        what = "top-1 agreement" if kind == "top1_agreement" else "per-label decision agreement"
        problems.append(f"{what} {report[kind]:.2%} < {min_agreement:.1%}")
    if max_diff is not None and report["max_rel_logit_diff"] > max_diff:
        problems.append(f"max |logit diff| {report['max_abs_logit_diff']:.2e} is {report['max_rel_logit_diff']:.1e} "
                        f"of the logits' scale > {max_diff:.0e}")
    return problems


def check_parity(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                 max_diff: float | None = MAX_LOGIT_DIFF) -> None:
    """Raise :class:`ExportError` when an export disagrees with eager beyond the thresholds."""
    problems = parity_problems(report, min_agreement, max_diff)
    if problems:
        raise ExportError(f"export parity check failed vs eager PyTorch on {report.get('source', 'images')}: "
                          + "; ".join(problems))


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for ``z`` = 1.96); (0, 1) for no trials.

    Example:
        >>> [round(x, 4) for x in wilson_interval(244, 245)]
        [0.9772, 0.9993]
    """
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def file_size_mb(path: str | os.PathLike) -> float:
    path = Path(path)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total / 1e6
