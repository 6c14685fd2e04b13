"""What every exported graph is: the deploy wrapper around the trained network, and its card.

Every exported graph wraps the trained network in :class:`DeployWrapper`, whose input is a
float32 NCHW batch *already normalised* with the model's mean/std at the model's input size
(exactly what :func:`visiontune.data.transforms.eval_transform` produces) and whose outputs are
``logits`` and ``probabilities`` (the task's head of logits / temperature: a softmax, or a sigmoid
per label). Keeping the head and the calibration temperature inside the graph is what makes an
exported model agree with the trained one: clients only have to reproduce the (documented,
stored) resize/crop/normalise step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.safe_io import atomic_write_text
from ..core.version import __version__
from ..data.preprocess import Preprocessing
from ..inference.runners import forward_logits
from ..models.card import ModelCard
from ..models.tta import tta_mode
from ..models.unknown import features_and_logits, score_of
from ..task import Task, get_task

INPUT_DOC = ("float32 NCHW [batch, 3, H, W] at the model's input size, RGB, scaled to 0..1 then "
             "normalised with the stored mean/std (resize shorter side to int(size/crop_pct), centre crop)")
INPUT_DOC_UINT8 = ("uint8 NHWC [batch, H, W, 3] RGB at the model's input size (resize shorter side to "
                   "int(size/crop_pct), centre crop); the graph scales and normalises it")
INPUT_DTYPES = ("float32", "uint8")


def input_doc(input_dtype: str = "float32") -> str:
    """What an exported graph's input is, for its metadata and its ``model.json``."""
    return INPUT_DOC_UINT8 if input_dtype == "uint8" else INPUT_DOC


class DeployWrapper(nn.Module):
    """Network + the ``task``'s temperature-scaled head (:meth:`~visiontune.task.Task.head`: a
    softmax, or a sigmoid per label): ``x -> (logits, probabilities)``.

    Example:
        wrapped = DeployWrapper(model, card.task, temperature=1.0)
        logits, probs = wrapped(torch.zeros(1, 3, 224, 224))
    """

    def __init__(self, model: nn.Module, task: Task | str, temperature: float = 1.0, tta: bool | str | None = None,
                 normalise: Preprocessing | None = None, score: nn.Module | None = None, classifier: str = ""):
        super().__init__()
        self.model = model
        self.tta = tta_mode(tta)  # the views the graph averages (visiontune.models.tta), built in
        # the unknown-score (visiontune.models.unknown), a third output, of the features it reads
        self.score, self.classifier = score, classifier
        self.task = get_task(task)
        # a buffer (not a Python float) so the value is visible as a constant in the graph
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        # ``normalise``: the input is uint8 NHWC and the graph does what data.preprocess.normalize does
        self.uint8_input = normalise is not None
        if normalise is not None:
            self.register_buffer("mean", torch.tensor(normalise.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(normalise.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.uint8_input:  # the same float32 steps as normalize(): x * (1/255), then (x - mean) / std
            x = x.permute(0, 3, 1, 2).float() * torch.tensor(1.0 / 255.0, dtype=torch.float32)
            x = (x - self.mean) / self.std
        if self.score is not None:
            features, logits = features_and_logits(self.model, self.classifier, x, self.tta, self.score.layer)
            return logits, self.task.head(logits, self.temperature), self.score(features, logits)
        logits = forward_logits(self.model, x, self.tta)
        return logits, self.task.head(logits, self.temperature)

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probabilities"] + (["unknown_score"] if self.score is not None else [])


def deploy_wrapper(model: nn.Module, card: ModelCard, normalise: Preprocessing | None = None) -> DeployWrapper:
    """The :class:`DeployWrapper` of ``model`` as ``card`` describes it: its task, temperature, test-time
    views and, when the card names one, its unknown-score (read from the model folder)."""
    return DeployWrapper(model, card.task, card.temperature, card.tta, normalise, score_of(model, card),
                         card.architecture.classifier if card.architecture else "").eval()


def input_shape(card: ModelCard) -> tuple[int, int, int]:
    return card.preprocessing.input_size


SCORED_FORMATS = ("onnx", "openvino", "torchscript")  # the graphs that compute the unknown-score inside


def export_card(card: ModelCard, fmt: str, file_name: str, **extra: Any) -> ModelCard:
    """The card of an exported file: the source card plus an ``export`` section (the unknown-score's
    section only for a format that computes it: an hf folder holds the weights alone)."""
    scored = bool(card.unknown) and fmt in SCORED_FORMATS
    return card.replace(unknown=card.unknown if scored else None,
                        export={"format": fmt, "file": file_name, "input": input_doc(extra.get("input_dtype")),
                                "outputs": ["logits", "probabilities"] + (["unknown_score"] if scored else []),
                                "temperature": card.temperature,
                                "probabilities": card.task.activation,
                                "visiontune_version": __version__, **extra})


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def graph_metadata(card: ModelCard, input_dtype: str = "float32") -> dict[str, str]:
    """What every exported graph carries about its model, all values strings: the ONNX file's
    ``metadata_props`` and the TorchScript file's extra file."""
    inference = card.task.card_inference(card.thresholds)  # e.g. a multi-label model's thresholds
    return {
        "class_names": json.dumps(list(card.class_names)),
        "preprocessing": json.dumps(card.preprocessing.to_dict()),
        "temperature": repr(card.temperature),
        "input_format": input_doc(input_dtype),
        "visiontune_version": __version__,
        "architecture": json.dumps(card.architecture.to_dict() if card.architecture else {}),
        # how "probabilities" are made and decided: softmax, or a sigmoid per label and its threshold
        "task": card.task.name,
        **{key: json.dumps(value) for key, value in inference.items() if key != "task"},
        # the views the graph averages, built in (visiontune.models.tta): a graph without its sidecar says so too
        **({"tta": card.tta} if card.tta else {}),
        # the unknown-score's kind and threshold: an image scoring below it is of no known class
        **({"unknown": json.dumps({k: card.unknown[k] for k in ("score", "layer", "threshold", "tpr",
                                                                   "val_quantiles")
                                   if k in card.unknown})} if card.unknown else {}),
    }
