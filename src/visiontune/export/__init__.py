"""Deploy-ready exports (ONNX, TorchScript, timm/HF layout) with verified parity, and compression.

Every export is checked against eager fp32 PyTorch right after it is written (top-1 agreement
and max |logit diff| on validation or generated images) and refused when it disagrees.
"""
