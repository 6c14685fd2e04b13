"""Runners: the forward pass of a classifier, whatever executes it.

A runner maps a preprocessed float32 NCHW batch to float32 logits on the CPU. :class:`TorchRunner`
runs the PyTorch module (channels-last, autocast at the chosen precision); :class:`OnnxRunner`
runs an exported graph with ONNX Runtime. Everything else (decoding, batching, rows) is shared
by :class:`~visiontune.inference.classifier.Classifier`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ArtifactError, ExportError
from ..core.hardware import autocast, device, resolve_precision
from ..data.preprocess import Preprocessing
from ..models.artifact import MAX_CARD_BYTES, META_FILE, WEIGHTS_FILE
from ..models.card import FORMAT, ModelCard
from ..models.tta import averaged, tta_mode
from ..models.unknown import ScoredModel
from ..task import TASKS
from .graph_files import onnx_model_bytes, read_beside, read_openvino

ONNX_SUFFIX = ".onnx"


def forward_logits(model: nn.Module, batch: torch.Tensor, tta: bool | str | None = None) -> torch.Tensor:
    """The model's logits; with ``tta`` (a mode of :mod:`visiontune.models.tta`, True: ``flip``)
    the mean of its views' logits.

    The one definition of a prediction's forward pass: the runner, the export wrapper and the
    export parity reference all call it (the views' loop is :func:`visiontune.models.tta.averaged`).
    """
    return averaged(model, batch, tta)


class TorchRunner:
    """A PyTorch module in eval mode on the best device, at ``precision`` (``tta``: the views it averages,
    :mod:`visiontune.models.tta`).

    With an unknown-score (``score``, computed on the input of the module named ``classifier``)
    each output row gains one last column: the score (``scores`` is True).
    """

    def __init__(self, model: nn.Module, precision: str = "auto", img_size: int = 224, tta: bool | str | None = None,
                 score: nn.Module | None = None, classifier: str = ""):
        self.device = device()
        tta = tta_mode(tta)
        if score is not None:
            model = ScoredModel(model, classifier, score, tta)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.precision = resolve_precision(precision, img_size)
        self.tta, self.scores = tta, score is not None

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            if self.scores:  # the views' averaging is the scored model's own (features and logits together)
                return self.model(batch).float().cpu()
            return forward_logits(self.model, batch, self.tta).float().cpu()


def onnx_session(path: str | os.PathLike, threads: int | None = None, dir_fd: int | None = None):
    """An onnxruntime CPU session with full graph optimisation; clear error for bad files.

    ONNX Runtime gets the model's bytes, read and checked by
    :func:`~visiontune.inference.graph_files.onnx_model_bytes` (no link followed, external data
    inlined, allocations bounded), never a path it would open itself.
    """
    import onnxruntime as ort  # lazy: only ONNX models need it

    model = onnx_model_bytes(path, dir_fd)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise for users
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} is not a usable ONNX model ({first[:200]})") from None


def session_logits(session, batch: np.ndarray, chunk: int = 32, pre: Preprocessing | None = None,
                   scores: bool = False) -> np.ndarray:
    """Run ``session`` on an NCHW float batch, in chunks the graph accepts (fixed batch: 1 by 1);
    ``scores``: its ``unknown_score`` output as one more column.

    A graph exported with ``--input-dtype uint8`` takes the resized pixels instead: the normalised
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
    names = ["logits", "unknown_score"] if scores else ["logits"]
    parts = [np.concatenate([np.asarray(out).reshape(len(batch[i:i + step]), -1)
                             for out in session.run(names, {name: batch[i:i + step]})], 1)
             for i in range(0, len(batch), step)]
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
        # a graph exported with an unknown-score gives it as one more column
        self.scores = "unknown_score" in {o.name for o in session.get_outputs()}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().numpy()
        # one call for the whole batch; a fixed-batch graph is fed in slices it accepts
        return torch.from_numpy(session_logits(self.session, array, chunk=max(1, len(array)), pre=self.pre,
                                               scores=self.scores)).float()

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None, dir_fd: int | None = None
             ) -> tuple[OnnxRunner, ModelCard]:
        """Open ``MODEL.onnx`` (or a folder holding ``model.onnx``) and read its card; ``dir_fd``:
        the file's folder, already open (the runtime cache reads its entries through one)."""
        path = onnx_file(Path(path)) if dir_fd is None else Path(path)
        session = onnx_session(path, threads, dir_fd)
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
    """The card of an exported ONNX graph: its own ``metadata_props``, see :func:`card_from_metadata`."""
    return card_from_metadata(path, session.get_modelmeta().custom_metadata_map, "onnx")


def card_from_metadata(path: Path, props: dict[str, str], fmt: str) -> ModelCard:
    """The card of an exported graph: the metadata inside the file (authoritative), plus the
    ``model.json`` written beside it when present and consistent."""
    if "class_names" not in props or "preprocessing" not in props:
        raise ExportError(f"{path} has no visiontune metadata (class_names, preprocessing); "
                          f"export it with `visiontune export MODEL --format {fmt}`")
    try:
        names, pre = json.loads(props["class_names"]), json.loads(props["preprocessing"])
        arch = json.loads(props["architecture"]) if props.get("architecture") else None
        temperature = float(props.get("temperature", 1.0))
        # the task's own record (what it writes into model.json), validated with the rest of the card below
        task = TASKS.get(props.get("task", "single"))
        if task is None:
            raise ExportError(f"{path}: unknown task {props.get('task')!r} in its metadata; known: {list(TASKS)}")
        inference = task.card_inference()
        if "thresholds" in props:  # checked against the task and the classes when the card is built
            inference["thresholds"] = json.loads(props["thresholds"])
        if "tta" in props:  # the views built into the graph (checked with the card); older graphs: the sidecar's
            inference["tta"] = props["tta"]
    except (json.JSONDecodeError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable visiontune metadata ({exc})") from None
    values: dict[str, Any] = {}
    side = path.parent / META_FILE
    if side.is_file():
        try:  # read like the graph: never through a link
            sidecar = json.loads(read_beside(path.parent, META_FILE, MAX_CARD_BYTES))
            values = sidecar if isinstance(sidecar, dict) else {}
        except (ExportError, ValueError, RecursionError):
            pass  # the graph file itself is authoritative; a broken (or linked) sidecar only loses extras
        if values.get("class_names", names) != names:
            raise ExportError(f"{side} and {path} disagree on the class names; re-export the model")
    values = {**values, "format": FORMAT, "class_names": names, "preprocessing": pre,
              "architecture": arch or values.get("architecture")}
    # the graph's own task, thresholds and tta decide, whatever the sidecar says; for graphs written before
    # the graph carried its tta, the sidecar's
    values["inference"] = {**{k: v for k, v in (values.get("inference") or {}).items() if k == "tta"}, **inference}
    if temperature != 1.0:
        values["calibration"] = {**(values.get("calibration") or {}), "temperature": temperature}
    values.pop("unknown", None)  # the graph's own unknown-score decides, not the sidecar's
    if "unknown" in props:
        try:
            values["unknown"] = json.loads(props["unknown"])
        except (ValueError, RecursionError) as exc:
            raise ExportError(f"{path}: unreadable visiontune metadata ({str(exc)[:200]})") from None
    try:
        return ModelCard.from_dict(values, str(path), require_architecture=False)
    except ArtifactError as exc:
        raise ExportError(str(exc)) from None


def _check_outputs(path: Path, session, card: ModelCard) -> None:
    outputs = {o.name: o.shape for o in session.get_outputs()}
    first = session.get_inputs()[0]
    check_graph_io(path, card, outputs, list(first.shape), first.type == "tensor(uint8)")


def check_graph_io(path: Path, card: ModelCard, outputs: dict[str, Any], shape: list[Any], uint8: bool) -> None:
    """The graph has a ``logits`` output as wide as the card's classes and the input the card's
    preprocessing makes (NCHW float, or NHWC pixels for ``export --input-dtype uint8``)."""
    if "logits" not in outputs:
        raise ExportError(f"{path} has no 'logits' output; it was not exported by visiontune")
    if ("unknown_score" in outputs) != bool(card.unknown):
        raise ExportError(f"{path}: its " + ("unknown_score output has no threshold in its metadata"
                                             if "unknown_score" in outputs else
                                             "metadata names an unknown-score but it has no unknown_score output")
                          + "; export the model again with `visiontune export`")
    if "unknown_score" in outputs and len(list(outputs["unknown_score"])) != 1:
        raise ExportError(f"{path}: its unknown_score output has shape {list(outputs['unknown_score'])}, not one "
                          "value per image; export the model again with `visiontune export`")
    width = list(outputs["logits"])[-1] if len(outputs["logits"]) else None
    if isinstance(width, int) and width != card.num_classes:
        raise ExportError(f"{path} outputs {width} classes but its metadata names {card.num_classes}")
    channels, height, width = card.preprocessing.input_size
    expected = [height, width, channels] if uint8 else [channels, height, width]
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != expected:
        raise ExportError(f"{path} input shape {shape} does not match the preprocessing input size {expected}")


# ----------------------------------------------------------------------------- OpenVINO
OPENVINO_FILE = "model.xml"
RT_INFO = "visiontune"  # the rt_info section of an OpenVINO model that holds the ONNX metadata_props


def openvino_file(path: Path) -> Path:
    if path.is_dir() and (path / OPENVINO_FILE).is_file():
        return path / OPENVINO_FILE
    if not path.is_file():
        raise ExportError(f"no OpenVINO model at {path}")
    return path


def is_openvino(path: str | os.PathLike) -> bool:
    """True for an OpenVINO ``.xml`` or a folder with ``model.xml`` and no PyTorch weights."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return True
    return path.is_dir() and (path / OPENVINO_FILE).is_file() and not (path / WEIGHTS_FILE).is_file()


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def preserve_signal_stack() -> Iterator[None]:
    """Keep the calling thread's alternate signal stack as it was across an OpenVINO compile.

    OpenVINO's CPU plugin installs its own alternate signal stack on the thread that compiles a
    model and puts back the one it found when that model is freed. Freed out of order (two models,
    the first freed first), the thread is left pointing at freed memory, and the next signal it
    handles (SIGCHLD when a child process exits) kills the process with SIGSEGV. Restoring the
    previous stack right after compiling keeps the thread's stack ours. Linux only (no-op elsewhere).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _StackT()
        ok = sys.platform.startswith("linux") and libc.sigaltstack(None, ctypes.byref(saved)) == 0
    except (OSError, AttributeError):
        ok = False
    try:
        yield
    finally:
        if ok:
            libc.sigaltstack(ctypes.byref(saved), None)


def openvino_compile(path: str | os.PathLike, threads: int | None = None, dir_fd: int | None = None
                     ) -> tuple[Any, dict[str, str]]:
    """A compiled OpenVINO CPU model (latency hint: one synchronous call uses every core) and its
    visiontune metadata; clear error for bad files. The ``.xml`` and ``.bin`` are read and the graph
    checked by :func:`~visiontune.inference.graph_files.read_openvino` before OpenVINO compiles it."""
    try:
        import openvino as ov  # lazy: only OpenVINO models need it
    except ImportError:
        raise ExportError("OpenVINO models need OpenVINO: pip install 'visiontune[openvino]'") from None
    try:
        core = ov.Core()
        model = read_openvino(core, path, dir_fd)
        props = {}
        if model.has_rt_info([RT_INFO]):
            props = {str(k): v.astype(str) for k, v in model.get_rt_info()[RT_INFO].items()}
        # f32: on CPUs with bf16 OpenVINO would otherwise run in bf16, far from the exported fp32 numbers
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        with preserve_signal_stack():
            return core.compile_model(model, "CPU", config), props
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} is not a usable OpenVINO model ({first[:200]})") from None


def compiled_logits(compiled, batch: np.ndarray, chunk: int = 32, pre: Preprocessing | None = None,
                    scores: bool = False) -> np.ndarray:
    """Run a compiled OpenVINO model like :func:`session_logits` (uint8 graphs get their pixels)."""
    port = compiled.input(0)
    if port.get_element_type().get_type_name() == "u8":
        if pre is None:
            raise ExportError("this OpenVINO model takes uint8 pixels; its preprocessing is needed to feed it")
        batch = uint8_pixels(batch, pre)
    else:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
    fixed = port.get_partial_shape()[0]
    step = fixed.get_length() if fixed.is_static else chunk
    ports = [compiled.output("logits")] + ([compiled.output("unknown_score")] if scores else [])
    parts = []
    for i in range(0, len(batch), step):
        out, rows = compiled(batch[i:i + step]), len(batch[i:i + step])
        parts.append(np.concatenate([np.asarray(out[port]).reshape(rows, -1) for port in ports], 1))
    return np.concatenate(parts)


def is_graph(path: str | os.PathLike) -> bool:
    """True for an exported graph (``.onnx`` or OpenVINO), which runs on its own runtime as it is."""
    return is_onnx(path) or is_openvino(path)


def load_graph(path: str | os.PathLike) -> tuple[OnnxRunner, ModelCard]:
    """The runner and card of an exported graph, on the runtime its format needs."""
    return (OnnxRunner if is_onnx(path) else OpenVinoRunner).load(path)


class OpenVinoRunner(OnnxRunner):
    """An exported OpenVINO model (``model.xml`` + ``model.bin``) run by OpenVINO on the CPU."""

    def __init__(self, compiled, path: str | os.PathLike = "", pre: Preprocessing | None = None):
        self.compiled = compiled
        self.path = str(path)
        self.pre = pre
        self._lock = threading.Lock()  # a compiled model's call reuses one infer request: one call at a time
        self.scores = any("unknown_score" in port.get_names() for port in compiled.outputs)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().cpu().numpy()
        with self._lock:
            logits = compiled_logits(self.compiled, array, chunk=max(1, len(array)), pre=self.pre, scores=self.scores)
        return torch.from_numpy(logits).float()

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None, dir_fd: int | None = None
             ) -> tuple[OpenVinoRunner, ModelCard]:
        """Open ``MODEL.xml`` (or a folder holding ``model.xml``) and read its card (``dir_fd``: as
        :meth:`OnnxRunner.load`)."""
        path = openvino_file(Path(path)) if dir_fd is None else Path(path)
        compiled, props = openvino_compile(path, threads, dir_fd)
        card = card_from_metadata(path, props, "openvino")
        outputs = {name: list(port.get_partial_shape().get_min_shape()) for port in compiled.outputs
                   for name in port.get_names()}
        shape = compiled.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        check_graph_io(path, card, outputs, dims, compiled.input(0).get_element_type().get_type_name() == "u8")
        card.model_dir = path.parent
        return cls(compiled, path, card.preprocessing), card
