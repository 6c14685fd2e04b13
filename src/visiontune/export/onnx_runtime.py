"""Run an exported ``.onnx`` with onnxruntime behind the :class:`Classifier` interface.

``visiontune predict`` / ``evaluate`` accept ``MODEL.onnx`` through :func:`load_any`; the output
format is identical because :class:`OnnxClassifier` reuses Classifier's batching, decoding and
row formatting and only replaces the forward pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data.transforms import eval_transform
from ..evaluation.predictor import Classifier
from ..models.artifact import META_FILE, WEIGHTS_FILE
from .common import ExportError
from .onnx_export import onnx_session, session_logits

ONNX_SUFFIX = ".onnx"


class OnnxClassifier(Classifier):
    """An exported ONNX model with its class names and preprocessing, ready to predict.

    Same public interface as :class:`Classifier`: ``class_names``, ``preprocessing``, ``meta``,
    ``transform``, ``predict()``, ``iter_batches()``, ``logits()``. It subclasses Classifier so
    code that checks ``isinstance(x, Classifier)`` (``evaluate``) accepts it unchanged.

    Example:
        >>> clf = OnnxClassifier.load("runs/train-1/export/onnx/model.onnx")  # doctest: +SKIP
        >>> clf.predict(["ant.jpg"])[0]["label"]  # doctest: +SKIP
        'ants'
    """

    def __init__(self, session, meta: dict[str, Any], path: str | os.PathLike = ""):
        # deliberately not calling Classifier.__init__: there is no torch module to move
        self.session = session
        self.path = str(path)
        self.device = "cpu"
        self.precision = "32"
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing: dict[str, Any] = dict(meta["preprocessing"])
        self.transform = eval_transform(self.preprocessing)
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        self.calibrated = "calibration" in meta

    @classmethod
    def load(cls, path: str | os.PathLike, precision: str = "auto", threads: int | None = None) -> OnnxClassifier:
        """Load ``MODEL.onnx`` (or a folder holding ``model.onnx``); ``precision`` is ignored (graph dtype)."""
        path = _onnx_file(Path(path))
        session = onnx_session(path, threads)
        meta = _read_meta(path, session)
        _check_outputs(path, session, meta)
        meta["model_dir"] = str(path.parent)
        return cls(session, meta, path)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) for a preprocessed NCHW float batch."""
        array = batch.detach().cpu().numpy()
        # one call for the whole batch; a fixed-batch graph is fed in slices it accepts
        return torch.from_numpy(session_logits(self.session, array, chunk=max(1, len(array)))).float()


def _onnx_file(path: Path) -> Path:
    if path.is_dir() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    if not path.is_file():
        raise ExportError(f"no ONNX model at {path}")
    return path


def _read_meta(path: Path, session) -> dict[str, Any]:
    """model.json beside the file when present, else the file's own metadata_props."""
    props = session.get_modelmeta().custom_metadata_map
    if "class_names" not in props or "preprocessing" not in props:
        raise ExportError(f"{path} has no visiontune metadata (class_names, preprocessing); "
                          "export it with `visiontune export MODEL --format onnx`")
    try:
        names, pre = json.loads(props["class_names"]), json.loads(props["preprocessing"])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: unreadable visiontune metadata ({exc})") from None
    side = path.parent / META_FILE
    meta: dict[str, Any] = {"class_names": names, "preprocessing": pre}
    sidecar: dict[str, Any] = {}
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text())
        except json.JSONDecodeError:
            pass  # the ONNX file itself is authoritative; a broken sidecar only loses extras
        meta = {**sidecar, **meta}
        if sidecar.get("class_names", names) != names:
            raise ExportError(f"{side} and {path} disagree on the class names; re-export the model")
    temperature = float(props.get("temperature", 1.0))
    if temperature != 1.0:
        meta["calibration"] = {**meta.get("calibration", {}), "temperature": temperature}
    return meta


def _check_outputs(path: Path, session, meta: dict[str, Any]) -> None:
    outputs = {o.name: o for o in session.get_outputs()}
    if "logits" not in outputs:
        raise ExportError(f"{path} has no 'logits' output; it was not exported by visiontune")
    width = outputs["logits"].shape[-1]
    if isinstance(width, int) and width != len(meta["class_names"]):
        raise ExportError(f"{path} outputs {width} classes but its metadata names {len(meta['class_names'])}")
    shape = session.get_inputs()[0].shape
    expected = list(meta["preprocessing"]["input_size"])
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != expected:
        raise ExportError(f"{path} input shape {shape} does not match the preprocessing input size {expected}")


def is_onnx(path: str | os.PathLike) -> bool:
    """True for a ``.onnx`` file or a folder with ``model.onnx`` and no PyTorch weights."""
    path = Path(path)
    if path.suffix.lower() == ONNX_SUFFIX:
        return True
    return path.is_dir() and (path / "model.onnx").is_file() and not (path / WEIGHTS_FILE).is_file()


def load_any(path: str | os.PathLike, precision: str = "auto") -> Classifier:
    """Load a run dir / model dir (PyTorch), a pruned model dir, or an exported ``.onnx``.

    Example:
        >>> clf = load_any("model.onnx")  # doctest: +SKIP
        >>> type(clf).__name__
        'OnnxClassifier'
    """
    if is_onnx(path):
        return OnnxClassifier.load(path, precision)
    from .prune import is_pruned, load_pruned

    if is_pruned(path):
        model, meta = load_pruned(path)
        return Classifier(model, meta, precision)
    return Classifier.load(path, precision)
