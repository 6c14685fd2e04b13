"""Runners: the forward pass of a classifier, whatever executes it.

A runner maps a preprocessed float32 NCHW batch to float32 logits on the CPU. :class:`TorchRunner`
runs the PyTorch module (channels-last, autocast at the chosen precision); :class:`OnnxRunner`
runs an exported graph with ONNX Runtime. Everything else (decoding, batching, rows) is shared
by :class:`~visiontune.inference.classifier.Classifier`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ArtifactError, ExportError
from ..core.hardware import autocast, device, resolve_precision
from ..data.preprocess import Preprocessing
from ..models.artifact import META_FILE, WEIGHTS_FILE, read_json
from ..models.card import FORMAT, ModelCard

ONNX_SUFFIX = ".onnx"


def forward_logits(model: nn.Module, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """The model's logits; with ``tta`` the mean of the image's and its mirror image's logits.

    The one definition of a prediction's forward pass: the runner, the export wrapper and the
    export parity reference all call it.
    """
    logits = model(batch)
    if tta:
        logits = (logits + model(batch.flip(-1))) / 2
    return logits


class TorchRunner:
    """A PyTorch module in eval mode on the best device, at ``precision`` (``tta``: flip averaging)."""

    def __init__(self, model: nn.Module, precision: str = "auto", img_size: int = 224, tta: bool = False):
        self.device = device()
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.precision = resolve_precision(precision, img_size)
        self.tta = tta

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            return forward_logits(self.model, batch, self.tta).float().cpu()


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with full graph optimisation; clear error for bad files."""
    import onnxruntime as ort  # lazy: only ONNX models need it

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise for users
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} is not a usable ONNX model ({first[:200]})") from None


def session_logits(session, batch: np.ndarray, chunk: int = 32, pre: Preprocessing | None = None) -> np.ndarray:
    """Run ``session`` on an NCHW float batch, in chunks the graph accepts (fixed batch: 1 by 1).

    A graph exported with ``--input uint8`` takes the resized pixels instead: the normalised
    batch is turned back into them with ``pre``'s mean/std (exact: it was made from such pixels).
    """
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else chunk
    name = session.get_inputs()[0].name
    if session.get_inputs()[0].type == "tensor(uint8)":
        if pre is None:
            raise ExportError("this ONNX graph takes uint8 pixels; its preprocessing is needed to feed it")
        batch = uint8_pixels(batch, pre)
    else:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
    parts = [session.run(["logits"], {name: batch[i:i + step]})[0] for i in range(0, len(batch), step)]
    return np.concatenate(parts)


def uint8_pixels(batch: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Normalised float NCHW -> the uint8 NHWC pixels it was computed from."""
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
    pixels = np.rint((np.asarray(batch, np.float32) * std + mean) * 255.0).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


class OnnxRunner:
    """An exported ONNX graph run by ONNX Runtime on the CPU."""

    device = "cpu"
    precision = "32"
    model = None  # no torch module (Grad-CAM needs a PyTorch model)

    def __init__(self, session, path: str | os.PathLike = "", pre: Preprocessing | None = None):
        self.session = session
        self.path = str(path)
        self.pre = pre  # for a graph that takes uint8 pixels

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().numpy()
        # one call for the whole batch; a fixed-batch graph is fed in slices it accepts
        return torch.from_numpy(session_logits(self.session, array, chunk=max(1, len(array)), pre=self.pre)).float()

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxRunner, ModelCard]:
        """Open ``MODEL.onnx`` (or a folder holding ``model.onnx``) and read its card."""
        path = onnx_file(Path(path))
        session = onnx_session(path, threads)
        card = onnx_card(path, session)
        _check_outputs(path, session, card)
        card.model_dir = path.parent
        return cls(session, path, card.preprocessing), card


def onnx_file(path: Path) -> Path:
    if path.is_dir() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    if not path.is_file():
        raise ExportError(f"no ONNX model at {path}")
    return path


def is_onnx(path: str | os.PathLike) -> bool:
    """True for a ``.onnx`` file or a folder with ``model.onnx`` and no PyTorch weights."""
    path = Path(path)
    if path.suffix.lower() == ONNX_SUFFIX:
        return True
    return path.is_dir() and (path / "model.onnx").is_file() and not (path / WEIGHTS_FILE).is_file()


def onnx_card(path: Path, session) -> ModelCard:
    """The card of an exported graph: its own ``metadata_props`` (authoritative), plus the
    ``model.json`` written beside it when present and consistent."""
    props = session.get_modelmeta().custom_metadata_map
    if "class_names" not in props or "preprocessing" not in props:
        raise ExportError(f"{path} has no visiontune metadata (class_names, preprocessing); "
                          "export it with `visiontune export MODEL --format onnx`")
    try:
        names, pre = json.loads(props["class_names"]), json.loads(props["preprocessing"])
        arch = json.loads(props["architecture"]) if props.get("architecture") else None
        temperature = float(props.get("temperature", 1.0))
        inference = {"task": props["task"]} if props.get("task", "single") != "single" else {}
        if "thresholds" in props:
            inference["thresholds"] = json.loads(props["thresholds"])
    except (json.JSONDecodeError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable visiontune metadata ({exc})") from None
    values: dict[str, Any] = {}
    side = path.parent / META_FILE
    if side.is_file():
        try:
            sidecar = read_json(side)
            values = sidecar if isinstance(sidecar, dict) else {}
        except ArtifactError:
            pass  # the ONNX file itself is authoritative; a broken sidecar only loses extras
        if values.get("class_names", names) != names:
            raise ExportError(f"{side} and {path} disagree on the class names; re-export the model")
    values = {**values, "format": FORMAT, "class_names": names, "preprocessing": pre,
              "architecture": arch or values.get("architecture")}
    # the graph's own task and thresholds decide, whatever the sidecar says; the sidecar may add tta
    values["inference"] = {**{k: v for k, v in (values.get("inference") or {}).items() if k == "tta"}, **inference}
    if temperature != 1.0:
        values["calibration"] = {**(values.get("calibration") or {}), "temperature": temperature}
    try:
        return ModelCard.from_dict(values, str(path), require_architecture=False)
    except ArtifactError as exc:
        raise ExportError(str(exc)) from None


def _check_outputs(path: Path, session, card: ModelCard) -> None:
    outputs = {o.name: o for o in session.get_outputs()}
    if "logits" not in outputs:
        raise ExportError(f"{path} has no 'logits' output; it was not exported by visiontune")
    width = outputs["logits"].shape[-1]
    if isinstance(width, int) and width != card.num_classes:
        raise ExportError(f"{path} outputs {width} classes but its metadata names {card.num_classes}")
    shape = session.get_inputs()[0].shape
    channels, height, width = card.preprocessing.input_size
    uint8 = session.get_inputs()[0].type == "tensor(uint8)"  # export --input uint8: NHWC pixels
    expected = [height, width, channels] if uint8 else [channels, height, width]
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != expected:
        raise ExportError(f"{path} input shape {shape} does not match the preprocessing input size {expected}")
