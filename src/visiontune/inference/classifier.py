"""``visiontune.load(path)`` -> :class:`Classifier`: batched prediction with the saved preprocessing.

One class for every kind of model folder: a run dir or ``model/`` dir (PyTorch, also pruned
models rebuilt from their card) runs on :class:`~visiontune.inference.runners.TorchRunner`, an
exported ``.onnx`` on :class:`~visiontune.inference.runners.OnnxRunner`; decoding, batching and
rows are the same for both.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..core.errors import ConfigError
from ..core.hardware import autocast
from ..core.progress import progress
from ..data.dataset import InputDataset, input_loader
from ..data.image import is_image_path
from ..data.transforms import eval_transform
from ..models.artifact import load_model, read_card, resolve_model_dir
from ..models.card import ModelCard
from ..models.tta import takes_zoom, tta_mode, view_count
from ..models.unknown import (
    ScoredModel,
    classifier_width,
    layer_width,
    mean_of_taps,
    score_of,
    tapped_views,
    threshold_for,
)
from .accelerated import BACKENDS, accelerates, cached_runner
from .rows import error_row, prediction_rows
from .runners import TorchRunner, is_graph, load_graph

ImageInput = str | os.PathLike | Image.Image | bytes
CHUNK_BATCHES = 64  # inputs handed to one loader at a time: workers restart rarely, memory stays bounded


class Classifier:
    """A trained model with its card (class names, preprocessing, calibration), ready to predict.

    Example:
        clf = visiontune.load("runs/train-1")
        clf.predict(["ant.jpg"])[0]["label"]
        # -> 'ants'
    """

    def __init__(self, runner: Callable[[torch.Tensor], torch.Tensor], card: ModelCard):
        self.runner = runner
        self.card = card
        self.class_names: list[str] = list(card.class_names)
        self.preprocessing = card.preprocessing
        self.transform = eval_transform(card.preprocessing)
        self.temperature, self.calibrated = card.temperature, card.calibrated
        self.task = card.task  # what the model answers: it decides, shapes rows, and reads labels
        # per-label decision thresholds (tuned on val, else 0.5 each; the single-label task ignores
        # them): training replaces them once it has tuned them
        self.thresholds: list[float] = card.thresholds
        # the unknown-score's threshold (None: the model has none, or the runner does not give it);
        # the runner then returns one more column than there are classes: the score
        self.unknown_threshold: float | None = card.unknown_threshold if getattr(runner, "scores", False) else None
        self.device: str = getattr(runner, "device", "cpu")
        self.precision: str = getattr(runner, "precision", "32")

    @classmethod
    def load(cls, path: str | os.PathLike, precision: str = "auto", tta: bool | str | None = None,
             backend: str = "eager") -> Classifier:
        """A run dir, ``model/`` dir, pruned model dir, exported ``.onnx`` or OpenVINO model; ``precision``
        auto|32|bf16|16 applies to PyTorch models; ``tta`` overrides the card's test-time augmentation
        (a mode of :mod:`visiontune.models.tta`, True: ``flip``, False: none; None: as the model was
        trained). ``backend`` ``auto`` runs a PyTorch model on
        the CPU through the runtime measured fastest and verified here (see
        :mod:`~visiontune.inference.accelerated`; ``prepare_runtime`` measures it), ``onnxruntime`` or
        ``openvino`` through that one when verified; eager PyTorch otherwise."""
        wanted = None if tta is None else tta_mode(tta)
        if is_graph(path):
            runner, card = load_graph(path)
            if wanted is not None and wanted != card.tta:
                raise ConfigError(f"{path}: an exported graph has its test-time augmentation built in "
                                  f"({card.tta or 'none'}); load the run or model folder to change it")
            return cls(runner, card)
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if backend != "eager" and accelerates(precision):
            card = read_card(resolve_model_dir(path))
            if wanted is None or wanted == card.tta:  # the graphs have the card's views built in
                runner = cached_runner(card.model_dir, card, backend, precision)
                if runner is not None:
                    return cls(runner, card)
        model, card = load_model(path)
        if wanted and wanted != card.tta and wanted != "flip" and not takes_zoom(model, card.preprocessing.height):
            raise ConfigError(f"--tta {wanted}: {path} takes only the input size it was trained at "
                              f"({card.preprocessing.height} px), not the enlarged view; use --tta flip or none")
        score = score_of(model, card)
        return cls(TorchRunner(model, precision, card.preprocessing.height, card.tta if wanted is None else wanted,
                               score, card.architecture.classifier), card)

    @property
    def model(self) -> torch.nn.Module | None:
        """The PyTorch network (None for an ONNX graph), without its unknown-score."""
        model = getattr(self.runner, "model", None)
        return model.model if isinstance(model, ScoredModel) else model

    def move_unknown_threshold(self, tpr: float | None) -> None:
        """Answer ``unknown`` below the score that accepts the share ``tpr`` of the model's val images
        (None: the threshold set at training). A model without an unknown-score refuses it."""
        if tpr is None:
            return
        if self.unknown_threshold is None:
            raise ConfigError("--threshold-tpr needs a model with an unknown-score (trained by this version "
                              "without --no-unknown)")
        self.unknown_threshold = threshold_for(self.card.unknown, tpr)

    def outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """What the runner gives for a preprocessed NCHW float batch: the logits ``[N, C]`` (float32,
        on CPU), and for a model with an unknown-score that score as one more column."""
        return self.runner(batch)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on CPU) for a preprocessed NCHW float batch."""
        return self.outputs(batch)[:, :len(self.class_names)]

    def split(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`outputs` -> (logits, unknown-scores or None)."""
        n = len(self.class_names)
        return outputs[..., :n], (outputs[..., n] if outputs.shape[-1] > n else None)

    def iter_batches(self, inputs: Sequence[ImageInput], batch_size: int = 64, workers: int | None = None
                     ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        """Yield (input indices, raw :meth:`outputs`, [(index, error)]) batch by batch, in input order."""
        dataset = InputDataset(inputs, self.transform, self.preprocessing.draft_size())
        for indices, tensor, errors in progress(input_loader(dataset, batch_size, workers), "predicting"):
            yield indices, (self.outputs(tensor) if tensor is not None else None), errors

    def features_of(self, inputs: Sequence[ImageInput], batch_size: int = 64, workers: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The classifier's input features ``[n, D]``, the raw logits ``[n, C]`` (both averaged over the
        mirror image when the model predicts so) and the mask of the readable inputs: what an
        unknown-score is fitted on. Needs the PyTorch model (a run or model folder)."""
        feats, logits, ok = self.taps_of(inputs, (None,), batch_size, workers)
        return feats[None], logits, ok

    def taps_of(self, inputs: Sequence[ImageInput], layers: Sequence[str | None], batch_size: int = 64,
                workers: int | None = None) -> tuple[dict[str | None, torch.Tensor], torch.Tensor, torch.Tensor]:
        """As :meth:`features_of`, for several sources of features in one pass over the images:
        ``{layer: [n, D_layer]}`` (None: the classifier's input; a module name: its pooled output)."""
        per_view, ok = self.view_taps(inputs, layers, getattr(self.runner, "tta", ""), batch_size, workers)
        return (*mean_of_taps(per_view), ok)

    def view_taps(self, inputs: Sequence[ImageInput], layers: Sequence[str | None], tta: bool | str | None,
                  batch_size: int = 64, workers: int | None = None
                  ) -> tuple[list[tuple[dict[str | None, torch.Tensor], torch.Tensor]], torch.Tensor]:
        """:meth:`taps_of` for each view of ``tta`` apart (:func:`~visiontune.models.unknown.tapped_views`,
        the image first), at the model's precision, as its predictions run: per view
        ``({layer: [n, D_layer]}, logits [n, C])``, and the mask of the readable inputs.
        :func:`mean_of_taps` of them is what a model predicting with ``tta`` reads; the first view's
        logits are what it predicts with one view."""
        model = self.model
        if model is None or self.card.architecture is None:
            raise ConfigError("features need the PyTorch model: load the run or model folder, not an exported graph")
        name = self.card.architecture.classifier
        layers = tuple(layers)
        count = view_count(tta)
        feats: list[dict[str | None, torch.Tensor]] = [{} for _ in range(count)]
        logits = [torch.zeros(len(inputs), len(self.class_names)) for _ in range(count)]
        ok = torch.zeros(len(inputs), dtype=torch.bool)
        dataset = InputDataset(inputs, self.transform, self.preprocessing.draft_size())
        with torch.inference_mode(), autocast(self.precision, self.device):
            for indices, tensor, _ in progress(input_loader(dataset, batch_size, workers), "features"):
                if indices:
                    batch = tensor.to(self.device).contiguous(memory_format=torch.channels_last)
                    for v, (fs, z) in enumerate(tapped_views(model, name, batch, tta, layers)):
                        for layer, f in zip(layers, fs):
                            if layer not in feats[v]:  # allocated once, at the first batch (its width)
                                feats[v][layer] = torch.zeros(len(inputs), f.shape[1])
                            feats[v][layer][indices] = f.float().cpu()
                        logits[v][indices] = z.float().cpu()
                    ok[indices] = True
        for layer in layers:  # nothing readable: empty rows of the right width
            for view in feats:
                if layer not in view:
                    view[layer] = torch.zeros(len(inputs), classifier_width(model, name) if layer is None
                                              else layer_width(model, layer, self.preprocessing.input_size))
        return list(zip(feats, logits)), ok

    def logits_of(self, inputs: Sequence[ImageInput], batch_size: int = 64, workers: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
        """Raw logits ``[n, C]`` of every input, the mask of the readable ones, and the errors."""
        outputs, ok, failed = self.outputs_of(inputs, batch_size, workers)
        return outputs[:, :len(self.class_names)], ok, failed

    def outputs_of(self, inputs: Sequence[ImageInput], batch_size: int = 64, workers: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
        """:meth:`outputs` ``[n, C]`` (``[n, C + 1]`` with the unknown-score) of every input, the mask
        of the readable ones, and the errors."""
        outputs = torch.zeros(len(inputs), len(self.class_names) + (self.unknown_threshold is not None))
        ok = torch.zeros(len(inputs), dtype=torch.bool)
        failed: dict[int, str] = {}
        for indices, batch, errors in self.iter_batches(inputs, batch_size, workers):
            if indices:
                outputs[indices] = batch
                ok[indices] = True
            failed.update(errors)
        return outputs, ok, failed

    def predict(self, inputs: ImageInput | Sequence[ImageInput], top_k: int = 5, batch_size: int = 64,
                workers: int | None = None, progress: bool = False,
                reject_below: float | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
        """Classify images (paths, PIL images or encoded bytes); one row per input, in order.

        Rows are described in :mod:`visiontune.inference.rows`. ``reject_below`` applies to
        single-label models; ``threshold`` replaces a multi-label model's per-label thresholds.
        """
        if isinstance(inputs, (str, os.PathLike, Image.Image, bytes)):
            inputs = [inputs]
        inputs = list(inputs)
        rows: Iterable[dict[str, Any]] = self.predict_stream(inputs, top_k, batch_size, workers, reject_below,
                                                             threshold)
        if progress:
            from tqdm import tqdm  # lazy: only interactive runs draw a bar

            rows = tqdm(rows, total=len(inputs), desc="predict", unit="img", leave=False)
        return list(rows)

    def predict_stream(self, inputs: Sequence[ImageInput], top_k: int = 5, batch_size: int = 64,
                       workers: int | None = None, reject_below: float | None = None,
                       threshold: float | None = None) -> Iterator[dict[str, Any]]:
        """Like :meth:`predict`, but yields rows in input order batch by batch (constant memory)."""
        thresholds = self.decision_thresholds(reject_below, threshold)
        step = batch_size * CHUNK_BATCHES
        for start in range(0, len(inputs), step):
            chunk = inputs[start:start + step]
            paths = [str(x) if isinstance(x, (str, os.PathLike)) else "" for x in chunk]
            rows: list[dict[str, Any] | None] = [None] * len(chunk)
            for indices, outputs, errors in self.iter_batches(chunk, batch_size, workers):
                for index, error in errors:
                    rows[index] = error_row(paths[index], error, self.calibrated, task=self.task)
                if indices:
                    logits, scores = self.split(outputs)
                    made = prediction_rows(logits, self.class_names, self.temperature, top_k, reject_below,
                                           self.calibrated, [paths[i] for i in indices], thresholds, task=self.task,
                                           unknown_scores=scores, unknown_threshold=self.unknown_threshold)
                    for index, row in zip(indices, made):
                        rows[index] = row
            yield from rows  # type: ignore[misc]

    def decision_thresholds(self, reject_below: float | None = None, threshold: float | None = None
                            ) -> list[float]:
        """The per-label thresholds rows are decided at: the model's, or ``threshold`` for every label
        (the single-label task ignores them). Each option is refused, naming the other, by the task
        that does not take it (:meth:`~visiontune.task.Task.check_options`)."""
        problem = self.task.check_options(reject_below, threshold)
        if problem:
            raise ConfigError(problem)
        return [float(threshold)] * len(self.class_names) if threshold is not None else list(self.thresholds)


def load(path: str | os.PathLike, precision: str = "auto", tta: bool | str | None = None,
         backend: str = "eager") -> Classifier:
    """:meth:`Classifier.load`; the function behind ``visiontune.load``."""
    return Classifier.load(path, precision, tta, backend)


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files, folders (recursive, images only) and glob patterns -> sorted unique file list."""
    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(str(p) for p in sorted(path.rglob("*")) if p.is_file() and is_image_path(p)
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            found.append(str(path))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            found.extend(matches if matches else [item])  # a missing file becomes an error row
    seen: set[str] = set()
    return [p for p in found if not (p in seen or seen.add(p))]
