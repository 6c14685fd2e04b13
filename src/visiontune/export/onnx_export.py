"""ONNX export with class names, preprocessing and temperature inside the file.

The graph input ``input`` is float32 NCHW, already normalised (see ``deploy.INPUT_DOC``), or with
``input_dtype="uint8"`` the resized uint8 NHWC pixels, normalised inside the graph; the
outputs are ``logits`` and ``probabilities``. ``metadata_props`` carry ``class_names``,
``preprocessing`` (JSON), ``temperature``, ``input_format`` and ``visiontune_version`` so a
client needs only onnxruntime + Pillow (``examples/onnx_client.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ExportError
from ..core.safe_io import atomic_write_bytes
from ..inference.runners import onnx_session, session_logits
from ..models.card import ModelCard
from .deploy import INPUT_DTYPES, DeployWrapper, deploy_wrapper, graph_metadata, input_shape
from .exporter import Format
from .static_pad import static_same_padding

DEFAULT_OPSET = 17


DYNAMO_MIN_OPSET = 18  # the dynamo exporter's own opset: asking for less runs a version converter
# that fails on some graphs (AlexNet's ReduceMean) after printing a traceback


def _export_graph(wrapper: DeployWrapper, example: torch.Tensor, opset: int, dynamic_batch: bool) -> bytes:
    """Serialised ONNX bytes; the TorchScript-based exporter first, dynamo as the fallback.

    The TorchScript-based exporter (``dynamo=False``) produces a plain, fully-folded graph that
    onnxruntime's quantizer handles best; dynamo is tried if it refuses the model (e.g. AlexNet
    at a small input size, where an adaptive pooling's output is not a factor of its input).
    Neither may print to the user: the first dumps its whole IR graph to stdout on failure (C++).
    """
    axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in wrapper.output_names}} if dynamic_batch else None
    names = dict(input_names=["input"], output_names=wrapper.output_names)
    errors = []
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings(), quiet_output():
                warnings.simplefilter("ignore")  # exporter deprecation chatter is not actionable here
                if dynamo:
                    program = torch.onnx.export(wrapper, (example,), dynamo=True, verbose=False,
                                                opset_version=max(opset, DYNAMO_MIN_OPSET), dynamic_shapes=(
                                                    {0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None,
                                                **names)
                    program.optimize()
                    return _program_bytes(program)
                torch.onnx.export(wrapper, (example,), buf, dynamo=False, dynamic_axes=axes,
                                  do_constant_folding=True, opset_version=opset, **names)
                return buf.getvalue()
        except Exception as exc:  # exporters raise many types; report both if both fail
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
    raise ExportError("ONNX export failed: " + " | ".join(e[:400] for e in errors))


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 (C++ and Python writes alike) to a discarded temporary file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _program_bytes(program) -> bytes:
    """Serialise a dynamo ``ONNXProgram`` (it only saves to a path)."""
    with tempfile.TemporaryDirectory(prefix="visiontune-onnx-") as tmp:
        program.save(str(Path(tmp) / "model.onnx"))
        return (Path(tmp) / "model.onnx").read_bytes()


def set_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Replace ``metadata_props`` of an ONNX file in place (also used after quantization)."""
    import onnx  # lazy: only exports need the onnx package

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "visiontune"
    atomic_write_bytes(path, model.SerializeToString())


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx  # lazy: as above

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def export_onnx(model: nn.Module, card: ModelCard, out: str | Path, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, input_dtype: str = "float32") -> Path:
    """Write ``model`` (wrapped with softmax + temperature) as ONNX with metadata to ``out``.

    Args:
        model: the trained network (eval mode, fp32, CPU).
        card: its model card (class names, preprocessing, calibration).
        out: the ``.onnx`` path to write.
        opset: ONNX opset version.
        dynamic_batch: make the batch dimension dynamic (default: fixed batch of 1).
        input_dtype: ``float32`` (normalised NCHW) or ``uint8`` (resized NHWC RGB pixels; the graph
            scales and normalises them, so thin clients cannot get the normalisation wrong).

    Example:
        model, card = load_model("runs/train-1")
        export_onnx(model, card, "model.onnx", dynamic_batch=True)
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *input_shape(card))
    # the graph's spatial size is fixed, so TF-"SAME" pads become constants (int8 needs this)
    fixed = static_same_padding(model.eval().float().cpu(), example)
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"--input-dtype {input_dtype!r}: choose one of {', '.join(INPUT_DTYPES)}")
    uint8 = input_dtype == "uint8"
    wrapper = deploy_wrapper(fixed, card, normalise=card.preprocessing if uint8 else None)
    if uint8:
        example = torch.zeros(1, card.preprocessing.height, card.preprocessing.width, 3, dtype=torch.uint8)
    data = _export_graph(wrapper, example, opset, dynamic_batch)
    atomic_write_bytes(out, data)
    set_metadata(out, graph_metadata(card, input_dtype))
    return out


FORMAT = Format(export_onnx, lambda path, card, batch: session_logits(onnx_session(path), batch.numpy(),
                                                                     pre=card.preprocessing), "model.onnx")
