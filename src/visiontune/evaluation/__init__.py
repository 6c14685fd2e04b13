"""Evaluation and prediction with saved models."""

from .evaluate import evaluate
from .predictor import Classifier

__all__ = ["Classifier", "evaluate"]
