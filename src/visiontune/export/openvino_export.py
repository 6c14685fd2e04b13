"""OpenVINO export: the ONNX graph (:mod:`~visiontune.export.onnx_export`) converted by OpenVINO.

The folder holds ``model.xml`` + ``model.bin`` (fp32 weights: no fp16 compression, so parity is
that of the ONNX graph) and ``model.json``; the ONNX file's ``metadata_props`` (class names,
preprocessing, temperature, task, thresholds) are copied into the model's ``rt_info`` under
``visiontune``, so the ``.xml`` alone describes itself, as the ``.onnx`` does. Inputs and outputs
are the ONNX graph's (``input``; ``logits``, ``probabilities``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import ExportError
from ..core.safe_io import refuse_link
from ..inference.runners import OPENVINO_FILE, RT_INFO, compiled_logits, openvino_compile, preserve_signal_stack
from ..models.card import ModelCard
from .exporter import Format
from .onnx_export import DEFAULT_OPSET, export_onnx, quiet_output, read_metadata
from .quantize import calibration_batches


def _openvino():
    try:
        import openvino as ov  # lazy: only this format needs it
    except ImportError:
        raise ExportError("OpenVINO export needs OpenVINO: pip install 'visiontune[openvino]'") from None
    return ov


def onnx_to_openvino(onnx_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert an exported ``.onnx`` to ``out`` (``.xml``, the ``.bin`` beside it), metadata included."""
    try:
        model = _openvino().convert_model(str(onnx_path))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"OpenVINO conversion failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return save_openvino(model, out, read_metadata(onnx_path))


def save_openvino(model, out: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write an OpenVINO ``model`` to ``out`` with ``metadata`` in its ``rt_info``; the pair is
    staged in a temporary folder and moved in place, never written through a link."""
    ov = _openvino()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (out, out.with_suffix(".bin")):
        refuse_link(path)
    for key, value in metadata.items():
        model.set_rt_info(value, [RT_INFO, key])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".openvino-") as tmp:
        staged = Path(tmp) / out.name
        ov.save_model(model, str(staged), compress_to_fp16=False)  # fp32 weights: ONNX parity
        os.replace(staged.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(staged, out)
    return out


def quantize_openvino(onnx_path: str | os.PathLike, out: str | os.PathLike, card: ModelCard,
                      calib_paths: Sequence[str] = ()) -> Path:
    """int8 post-training quantization of the fp32 ONNX export with NNCF (OpenVINO's quantizer):
    per-channel weights, activations calibrated on up to 300 images (NNCF's default sample).

    Example:
        quantize_openvino("model.onnx", "int8/model.xml", card, calib_paths)
    """
    ov = _openvino()
    batches = calibration_batches(card, calib_paths, None, limit=NNCF_SUBSET)
    try:
        model = ov.convert_model(str(onnx_path))
        # NNCF draws progress bars and its import logs torch notices: not the user's business
        with quiet_output(), warnings.catch_warnings(), preserve_signal_stack():  # NNCF compiles models
            warnings.simplefilter("ignore")
            try:
                import nncf  # lazy: only compress --backend openvino quantizes with it
            except ImportError:
                raise ExportError("--backend openvino needs NNCF: pip install 'visiontune[openvino]'") from None
            quantized = nncf.quantize(model, nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                                      subset_size=len(batches))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"NNCF quantization failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return save_openvino(quantized, out, {**read_metadata(onnx_path), "quantization": "int8"})


NNCF_SUBSET = 300


def export_openvino(model: nn.Module, card: ModelCard, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
                    dynamic_batch: bool = False, input_dtype: str = "float32") -> Path:
    """Write ``model`` as an OpenVINO model at ``out`` (a ``.xml`` path, or a folder that gets
    ``model.xml``), through its ONNX export.

    Example:
        model, card = load_model("runs/train-1")
        export_openvino(model, card, "ov/model.xml", dynamic_batch=True)
    """
    out = Path(out)
    if out.suffix.lower() != ".xml":  # a folder: predict/evaluate/serve find model.xml in it
        out = out / OPENVINO_FILE
    with tempfile.TemporaryDirectory(prefix="visiontune-openvino-") as tmp:
        onnx_path = export_onnx(model, card, Path(tmp) / "model.onnx", opset, dynamic_batch, input_dtype)
        return onnx_to_openvino(onnx_path, out)


def openvino_logits(path: Path, card: ModelCard, batch: torch.Tensor) -> np.ndarray:
    compiled, _ = openvino_compile(path)
    return compiled_logits(compiled, batch.numpy(), pre=card.preprocessing)


FORMAT = Format(export_openvino, openvino_logits, OPENVINO_FILE)
