"""int8 post-training quantization of an exported ONNX model with ONNX Runtime.

Static (default): QDQ format, per-channel int8 weights, activations calibrated on a sample of
real images. Dynamic (``int8-dynamic``): weights only, no calibration data; the fallback when
static calibration is impossible or hurts too much.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import ExportError
from ..inference.runners import onnx_session, session_logits
from ..models.card import ModelCard
from .deploy import input_shape
from .onnx_export import read_metadata, set_metadata
from .registry import QUANTIZE_MODES
from .samples import eval_batch, generated_images


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` feeding preprocessed images one batch at a time."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name = input_name
        self._iter = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # not needed by MinMax calibration; kept for the interface
        pass


def calibration_limit(card: ModelCard) -> int:
    """How many calibration images fit in memory.

    ORT's MinMax calibrator keeps every intermediate tensor of every calibration image until the
    end (its ``CalibMaxIntermediateOutputs`` option discards data rather than reducing it), so the
    sample is sized by pixels: 128 images at 224 px, up to 512 at small sizes (more images gave
    +0.75 pt int8 accuracy on CIFAR-10 at 64 px).
    """
    _, height, width = input_shape(card)
    return int(min(512, max(64, 128 * 224 * 224 / (height * width))))


def calibration_batches(card: ModelCard, paths: Sequence[str], fixed_batch: int | None,
                        limit: int | None = None, chunk: int = 16) -> list[np.ndarray]:
    """Preprocessed calibration batches (generated images when no real ones are given)."""
    limit = limit or calibration_limit(card)
    if paths:
        step = max(1, len(paths) // limit)  # spread the sample over every class
        tensor = eval_batch(list(paths)[::step][:limit], card.preprocessing)
    else:
        _, height, width = input_shape(card)
        tensor = eval_batch(generated_images(32, max(height, width) * 2, seed=1), card.preprocessing)
    array = tensor.numpy().astype(np.float32)
    size = fixed_batch or chunk
    return [np.ascontiguousarray(array[i:i + size]) for i in range(0, len(array) - size + 1, size)] or [array[:size]]


def quantize_onnx(src: str | Path, dst: str | Path, card: ModelCard, mode: str = "int8",
                  calib_paths: Sequence[str] = (), float_ends: bool = False) -> Path:
    """Quantize ``src`` (fp32 ONNX from :func:`export_onnx`) into ``dst``, keeping its metadata.

    Example:
        quantize_onnx("model.onnx", "model.int8.onnx", card, "int8", calib_paths)
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazy: only compress quantizes
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in QUANTIZE_MODES:
        raise ExportError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANTIZE_MODES)}")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    props = read_metadata(src)
    with tempfile.TemporaryDirectory(prefix="visiontune-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + graph folding (BN into conv) first, as ORT recommends for QDQ
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if mode == "int8-dynamic":
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        else:
            _quantize_static(prepared, dst, card, calib_paths, float_ends)
    scheme = "ends-float" if float_ends and mode == "int8" else "all"
    # the quantizer drops metadata_props
    set_metadata(dst, {**props, "quantization": mode, "int8_scheme": scheme})
    _smoke_run(dst, card)
    return dst


def _float_ends(model) -> list[str]:
    """The first conv and the classifier (kept in float with ``float_ends``)."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return convs[:1] + [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1:]


def _quantize_static(prepared: Path, dst: Path, card: ModelCard, calib_paths: Sequence[str],
                     float_ends: bool) -> None:
    """Static QDQ quantization; ``float_ends`` keeps the first conv and the classifier in float.

    Keeping the ends in float is the usual remedy when int8 flips a few decisions (measured:
    hymenoptera at 224 px lost one validation image of 49 with every layer in int8, none with the
    ends in float; CIFAR-10 at 64 px was better fully quantized), so it is not the first choice:
    ``compress`` retries with it only when the fully quantized model fails the accuracy guard.
    """
    import onnx  # lazy: as above
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(prepared))
    graph_input = model.graph.input[0]
    dim0 = graph_input.type.tensor_type.shape.dim[0]
    batches = calibration_batches(card, calib_paths, dim0.dim_value if dim0.HasField("dim_value") else None)
    quantize_static(str(prepared), str(dst), ImageCalibrationReader(graph_input.name, batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=_float_ends(model) if float_ends else [],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def _smoke_run(path: Path, card: ModelCard) -> None:
    """Run the int8 graph once on a batch of 2: some ORT int8 kernels reject shapes only at run time."""
    try:
        session_logits(onnx_session(path), np.zeros((2, *input_shape(card)), np.float32))
    except ExportError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"onnxruntime cannot run the quantized model {path} ({first}); "
                          "try --quantize int8-dynamic or a larger --img-size") from None
