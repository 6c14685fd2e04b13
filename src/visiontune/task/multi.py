"""Multi-label classification: any number of labels per image, a sigmoid and a threshold per label.

Binary cross-entropy on each label's logit (``pos_weight`` from ``--balance weights``); the
running accuracy is the share of label decisions right at p = 0.5 (1 - Hamming loss); models are
selected by macro mAP. (The asymmetric loss of Ridnik et al. 2021 was tried on the mosaic
benchmark and did not pay: bench/RESULTS.md, "Multi-label: loss".)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Label, Task, as_float, ranking

DEFAULT_THRESHOLD = 0.5  # a label's decision threshold until tuned on validation


class MultiLabel(Task):
    """Any number of labels per image. Targets are multi-hot ``[N, C]`` (float); a label is
    decided when its probability reaches its threshold (tuned on val, else 0.5)."""

    name = "multi"
    title = "multi-label"
    activation = "sigmoid per label"
    default_selection = "map"
    headline = "macro mAP"
    score_key = "val_map"
    change_key = "map_change_pts"
    agreement_key = "label_agreement"
    decision_words = "per-label decisions"
    hf_problem_type = "multi_label_classification"
    selection_metrics = ("macro_f1", "map")
    pseudo_labels = False

    def owns(self, label: Label) -> bool:
        return isinstance(label, torch.Tensor) and label.dim() == 1

    def targets(self, labels: Sequence[Label], num_classes: int) -> torch.Tensor:
        if not len(labels):
            return torch.zeros(0, num_classes)
        return torch.stack(list(labels)).float()

    def indices(self, label: Label) -> list[int]:
        return [int(i) for i in torch.nonzero(label > 0.5).flatten()]

    def counts(self, labels: Sequence[Label], num_classes: int) -> torch.Tensor:
        return self.targets(labels, num_classes).sum(0) if len(labels) else torch.zeros(num_classes)

    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> nn.Module:
        return nn.BCEWithLogitsLoss(pos_weight=class_weights)

    def soft_loss(self, loss_fn: nn.Module, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        # the two images' multi-hot targets mixed by the same lambda: still a BCE target
        return loss_fn(logits.float(), soft)

    def plain_loss(self, logits: torch.Tensor, target: torch.Tensor) -> float:
        return float(nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float()))

    def accuracy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((logits > 0) == (target > 0.5)).float().mean()

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchmetrics' multi-label metrics take probabilities (raw logits all inside [0, 1] would be
        # read as probabilities) and integer targets
        return torch.sigmoid(logits.float()), target.int()

    def metrics(self, num_classes: int) -> dict[str, Any]:
        from torchmetrics.classification import (
            MultilabelAccuracy,
            MultilabelAveragePrecision,
            MultilabelF1Score,
        )

        return {"accuracy": MultilabelAccuracy(num_labels=num_classes, average="micro"),
                "macro_f1": MultilabelF1Score(num_labels=num_classes, average="macro"),
                "map": MultilabelAveragePrecision(num_labels=num_classes, average="macro")}

    def score(self, metric: str, logits: torch.Tensor, target: torch.Tensor) -> float:
        from torchmetrics.functional.classification import (
            multilabel_accuracy,
            multilabel_average_precision,
            multilabel_f1_score,
        )

        n = logits.shape[1]
        probs, y = self.metric_inputs(logits, target)
        if metric == "map":
            return float(multilabel_average_precision(probs, y, num_labels=n, average="macro"))
        if metric == "macro_f1":
            return float(multilabel_f1_score(probs, y, num_labels=n, average="macro"))
        return float(multilabel_accuracy(probs, y, num_labels=n, average="micro"))

    def class_weights(self, counts: torch.Tensor, num_samples: int) -> torch.Tensor:
        # each label's pos_weight = negatives / positives
        return (num_samples - counts).clamp(min=0) / counts.clamp(min=1)

    def sample_weights(self, labels: Sequence[Label], counts: torch.Tensor) -> torch.Tensor:
        # 1 / n_c of the image's rarest label; images with no label: 1 / their count
        targets = torch.stack(list(labels)).double() > 0.5
        empty = int((~targets.any(1)).sum())
        rarity = torch.where(targets, 1.0 / counts.double().clamp(min=1), torch.zeros((), dtype=torch.double))
        return torch.where(targets.any(1), rarity.amax(1), torch.tensor(1.0 / max(empty, 1), dtype=torch.double))

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return torch.sigmoid(as_float(logits) / float(temperature))

    def decide(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        limits = [DEFAULT_THRESHOLD] * probs.shape[-1] if thresholds is None else list(thresholds)
        return probs >= torch.tensor(limits, dtype=probs.dtype)

    def gradient_if_decided(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        # binary cross-entropy's gradient at the logits: sigmoid - target, each label as decided
        return probs - self.decide(probs, thresholds).to(probs.dtype)

    def _closeness(self, probs: torch.Tensor, thresholds: Sequence[float] | None) -> torch.Tensor:
        """Per label, 1 on its threshold and 0 at the far end (0 or 1) of the side it is on."""
        limits = torch.tensor([DEFAULT_THRESHOLD] * probs.shape[-1] if thresholds is None else list(thresholds),
                              dtype=probs.dtype)
        side = torch.where(probs >= limits, 1 - limits, limits).clamp_min(1e-6)
        return (1.0 - (probs - limits).abs() / side).clamp(0.0, 1.0)

    def uncertainty(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        # the label nearest its threshold decides
        return self._closeness(probs, thresholds).amax(dim=-1)

    def uncertainty_reason(self, probs: torch.Tensor, class_names: Sequence[str],
                           thresholds: Sequence[float] | None = None) -> str:
        limits = [DEFAULT_THRESHOLD] * probs.shape[-1] if thresholds is None else list(thresholds)
        j = int(self._closeness(probs.unsqueeze(0), thresholds)[0].argmax())
        return f"{class_names[j]} {float(probs[j]):.2f} at its threshold {limits[j]:.2f}"

    def headline_score(self, probs: torch.Tensor, target: torch.Tensor) -> float:
        from torchmetrics.functional.classification import multilabel_average_precision

        return float(multilabel_average_precision(probs, target.int(), num_labels=probs.shape[1], average="macro"))

    def row(self, probs: torch.Tensor, class_names: Sequence[str], top_k: int = 5, calibrated: bool = False,
            path: str = "", thresholds: Sequence[float] | None = None,
            reject_below: float | None = None) -> dict[str, Any]:
        values = probs.tolist()
        limits = [DEFAULT_THRESHOLD] * len(values) if thresholds is None else thresholds
        return {"path": path, "labels": [n for n, p, t in zip(class_names, values, limits) if p >= t],
                "scores": dict(zip(class_names, values)), "top_k": ranking(probs, class_names, top_k),
                "calibrated": calibrated, "error": ""}

    def reject(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "labels": []}  # scores still say how each label would have been answered

    def error_row(self, path: str, error: str, calibrated: bool = False) -> dict[str, Any]:
        return {"path": path, "labels": [], "scores": {}, "top_k": [], "calibrated": calibrated, "error": error}

    def csv_columns(self, class_names: Sequence[str]) -> list[str]:
        return ["labels", *(f"p_{n}" for n in class_names)]

    def csv_cells(self, row: dict[str, Any], class_names: Sequence[str], delim: str = " ") -> list[str]:
        scores = row["scores"]
        return [delim.join(row["labels"]), *(f"{scores[n]:.6f}" if n in scores else "" for n in class_names)]

    def card_inference(self, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
        return {"task": self.name, **({"thresholds": [float(t) for t in thresholds]} if thresholds else {})}

    def check_thresholds(self, thresholds: Any, num_classes: int) -> str:
        if thresholds is None:
            return ""
        if (not isinstance(thresholds, list) or len(thresholds) != num_classes
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0
                           for t in thresholds)):
            return f"inference.thresholds must list {num_classes} numbers in [0, 1]"
        return ""

    def check_options(self, reject_below: float | None = None, threshold: float | None = None) -> str:
        if reject_below is not None:
            return ("--reject-below is for single-label models; a multi-label model takes --threshold "
                    "(one decision threshold for every label)")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            return f"--threshold must be in [0, 1], got {threshold}"
        return ""

    def answer_text(self, row: dict[str, Any]) -> str:
        # a JSON array: class names may hold any separator
        return json.dumps(row["labels"], ensure_ascii=False)

    def serve_info(self, class_names: Sequence[str], thresholds: Sequence[float]) -> dict[str, Any]:
        return {"thresholds": dict(zip(class_names, thresholds))}

    def readme_phrases(self, calibrated: bool = False) -> dict[str, Any]:
        return {"tags": ["multi-label-classification"],
                "use": "says which of these labels are present in an image (any number, each with its own "
                       "probability and threshold)",
                "caveat": "."}

    agreement_words = "per-label decision agreement"
    headline_bounded_by_agreement = False  # mAP ranks the probabilities, which move without any decision changing

    def head(self, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits / temperature)

    def distillation(self, logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        # each label's binary cross-entropy to the teacher's softened sigmoid
        target = torch.sigmoid(teacher_logits / temperature)
        return nn.functional.binary_cross_entropy_with_logits(logits / temperature, target)

    def hf_config(self, thresholds: Sequence[float], temperature: float) -> dict[str, Any]:
        # transformers' name for sigmoid outputs, with what decides each label
        return {"problem_type": self.hf_problem_type, "thresholds": [float(t) for t in thresholds],
                "temperature": temperature}

    description = "any number of classes per image (sigmoid outputs)"

    def mixup_options(self, label_smoothing: float) -> dict[str, Any]:
        # the two images' multi-hot targets mixed by the same lambda
        # the two images' multi-hot targets mixed by the same lambda, unsmoothed
        return {"label_smoothing": 0.0, "multi_label": True}
