"""Inference: a :class:`Classifier` over a runner (torch eager, ONNX Runtime), prediction rows,
and frozen-backbone feature extraction. Everything above (training, evaluation, export, serve)
predicts through here."""
