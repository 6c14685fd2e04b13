"""The export layer's named choices (light: the CLI parser never imports onnx or torch.onnx)."""

from __future__ import annotations

from ..core.registry import Registry

_EXPORT = "visiontune.export."
EXPORT_FORMATS = Registry("format", {
    "onnx": (_EXPORT + "onnx_export:FORMAT", "float32 normalised NCHW in; logits, probabilities (and the "
             "unknown_score) out; metadata inside"),
    "openvino": (_EXPORT + "openvino_export:FORMAT", "OpenVINO model.xml + model.bin, converted from the ONNX graph; "
                 "same inputs, outputs and metadata"),
    "torchscript": (_EXPORT + "torchscript_export:FORMAT", ".pt that loads with torch.jit.load alone"),
    "hf": (_EXPORT + "hf_export:FORMAT", "timm / Hugging Face Hub folder (config.json + safetensors)")})

QUANTIZE_MODES = Registry("quantize", {
    "int8": ("int8", "static QDQ, per-channel weights, calibrated on training images"),
    "int8-dynamic": ("int8-dynamic", "weights only, no calibration")})

PRUNE_IMPORTANCES = Registry("importance", {
    "hessian": (_EXPORT + "prune:HESSIAN", "Optimal Brain Damage, empirical Fisher"),
    "taylor": (_EXPORT + "prune:TAYLOR", "first-order Taylor"),
    "magnitude": (_EXPORT + "prune:MAGNITUDE", "weight magnitude")})

INT8_BACKENDS = Registry("int8 backend", {
    "onnxruntime": ("onnxruntime", "ONNX Runtime static QDQ"),
    "openvino": ("openvino", "NNCF post-training quantization")})
