"""The options of ``visiontune export`` and ``visiontune compress``, each defined once.

Light on purpose (no torch, no onnx): the CLI builds its flags from these dataclasses, and
:func:`~visiontune.export.exporter.export_model` and :func:`~visiontune.export.compress.compress`
take the same names as keywords.

Example:
    >>> CompressOptions.from_dict({"quantize": "int8", "int8_backend": "openvino"}).int8_backend
    'openvino'
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.options import CommandOptions, option
from .registry import EXPORT_FORMATS, INT8_BACKENDS, QUANTIZE_MODES

_positive = (lambda v: v >= 1, "must be >= 1")


@dataclass
class ExportOptions(CommandOptions):
    """Every option of ``visiontune export`` and :func:`~visiontune.export.exporter.export_model`."""

    format: str = option("onnx", "what to write", choices=EXPORT_FORMATS)
    out: str | None = option(None, "output file (folder for hf); default RUN/export/FORMAT/", metavar="PATH")
    dynamic_batch: bool = option(False, "ONNX/OpenVINO: dynamic batch dimension (default: batch 1)")
    opset: int = option(17, "ONNX opset version (17)", check=(lambda v: 11 <= v <= 30, "must be 11-30"))
    input_dtype: str = option("float32", "ONNX/OpenVINO input: float32 normalised NCHW (default), or uint8 NHWC "
                                         "RGB pixels at the input size, scaled and normalised inside the graph "
                                         "(thin clients cannot get it wrong)", choices=("float32", "uint8"))
    data: str | None = option(None, "labelled images for the parity check (default: the model's validation split)",
                              metavar="DIR|CSV")
    parity_images: int = option(64, "images in the parity check (64)", check=_positive)


@dataclass
class CompressOptions(CommandOptions):
    """Every option of ``visiontune compress`` and :func:`~visiontune.export.compress.compress`."""

    quantize: str | None = option(None, "int8 quantization", choices=QUANTIZE_MODES)
    int8_backend: str = option("onnxruntime", "int8 runtime (the table adds OpenVINO fp32 beside ONNX Runtime's "
                                              "for openvino)", choices=INT8_BACKENDS)
    int8_float_ends: bool = option(False, "static int8: keep the first conv and the classifier in float (when int8 "
                                          "flips decisions)")
    prune: float | None = option(None, "share of channels to remove, e.g. 0.3", metavar="RATIO",
                                 check=(lambda v: v is None or 0.0 < v < 1.0, "must be in (0, 1)"))
    finetune_epochs: int = option(3, "recovery epochs after each pruning round, distilled from the unpruned model "
                                     "(3; 0: least-squares reconstruction alone, best for a few hundred images)",
                                  check=(lambda v: v >= 0, "must be >= 0"))
    prune_steps: int = option(2, "pruning rounds, each removing an equal share then recovering (2)",
                              check=_positive)
    recovery_lr: float | None = option(None, "learning rate of the recovery fine-tune (1e-3; 1e-4 suits a few "
                                             "hundred images)", check=(lambda v: v is None or v > 0, "must be > 0"))
    calib: str | None = option(None, "calibration images (default: the training split)", metavar="DATA")
    data: str | None = option(None, "labelled val images (default: the val split)", metavar="DIR|CSV")
    out: str | None = option(None, "output folder (default RUN/compress)", metavar="PATH")
    max_drop: float = option(1.0, "refuse an int8 model that changes more than this share of top-1 decisions on all "
                                  "training + val images (it bounds the accuracy lost; multi-label: val macro mAP "
                                  "drop), in points (1.0)", metavar="PTS")
    force: bool = option(False, "accept a larger drop (exit 0, report still says so)")
    bench_seconds: float = option(3.0, "timing budget per measurement (3)", metavar="S",
                                  check=(lambda v: v > 0, "must be > 0"))
