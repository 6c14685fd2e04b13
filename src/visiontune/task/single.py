"""Single-label classification: one class per image, softmax, cross-entropy, top-1 decisions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import UNKNOWN, Label, Task, as_float, ranking


class SingleLabel(Task):
    """One class per image. Targets are class indices ``[N]`` (long); ``reject_below`` turns a
    prediction whose top probability is below it into ``unknown``."""

    name = "single"
    title = "single-label"
    activation = "softmax"
    default_selection = "accuracy"
    headline = "accuracy"
    score_key = "val_accuracy"
    change_key = "accuracy_change_pts"
    agreement_key = "top1_agreement"
    decision_words = "top-1 decisions"
    hf_problem_type = None
    selection_metrics = ("macro_f1", "balanced_accuracy")
    pseudo_labels = True

    def owns(self, label: Label) -> bool:
        return not isinstance(label, torch.Tensor) or label.dim() == 0

    def targets(self, labels: Sequence[Label], num_classes: int) -> torch.Tensor:
        return torch.tensor([int(y) for y in labels], dtype=torch.long)

    def indices(self, label: Label) -> list[int]:
        return [int(label)]

    def counts(self, labels: Sequence[Label], num_classes: int) -> torch.Tensor:
        return torch.bincount(self.targets(labels, num_classes), minlength=num_classes).float()

    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> nn.Module:
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)

    def soft_loss(self, loss_fn: nn.Module, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        # timm's SoftTargetCrossEntropy: the smoothing is already in the mixed targets
        return torch.sum(-soft * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def plain_loss(self, logits: torch.Tensor, target: torch.Tensor) -> float:
        return float(nn.functional.cross_entropy(logits.float(), target))

    def accuracy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == target).float().mean()

    def metrics(self, num_classes: int) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

        # balanced accuracy = macro-averaged recall
        return {"accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
                "balanced_accuracy": MulticlassRecall(num_classes=num_classes, average="macro")}

    def score(self, metric: str, logits: torch.Tensor, target: torch.Tensor) -> float:
        from torchmetrics.functional.classification import multiclass_f1_score, multiclass_recall

        n = logits.shape[1]
        if metric == "macro_f1":
            return float(multiclass_f1_score(logits, target, num_classes=n, average="macro"))
        if metric == "balanced_accuracy":
            return float(multiclass_recall(logits, target, num_classes=n, average="macro"))
        return float(self.accuracy(logits, target))

    def class_weights(self, counts: torch.Tensor, num_samples: int) -> torch.Tensor:
        # n / (k * n_c): each class weighs the same in total
        return counts.sum() / (len(counts) * counts.clamp(min=1))

    def sample_weights(self, labels: Sequence[Label], counts: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0 / counts[int(label)].item() for label in labels], dtype=torch.double)

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return torch.softmax(as_float(logits) / float(temperature), dim=-1)

    def decide(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        return probs.argmax(-1)

    def gradient_if_decided(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        # cross-entropy's gradient at the logits: p - one_hot(label)
        return probs - torch.nn.functional.one_hot(self.decide(probs), probs.shape[-1]).to(probs.dtype)

    def uncertainty(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        # one minus the margin between the two most probable classes
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
        return 1.0 - margin

    def uncertainty_reason(self, probs: torch.Tensor, class_names: Sequence[str],
                           thresholds: Sequence[float] | None = None) -> str:
        top = probs.topk(min(2, probs.shape[-1]))
        pairs = [f"{class_names[int(i)]} {float(p):.2f}" for p, i in zip(top.values, top.indices)]
        return " vs ".join(pairs)

    def headline_score(self, probs: torch.Tensor, target: torch.Tensor) -> float:
        # averaged in float64: the share of N images is exact in the reports (0.28, not 0.2800000012)
        return float((probs.argmax(-1) == target).double().mean())

    def agreement(self, logits: torch.Tensor, reference: torch.Tensor, temperature: float = 1.0,
                  thresholds: Sequence[float] | None = None) -> float:
        # the top-1 of the logits themselves (a temperature keeps their order), averaged in float64
        return float((logits.argmax(-1) == reference.argmax(-1)).double().mean())

    def row(self, probs: torch.Tensor, class_names: Sequence[str], top_k: int = 5, calibrated: bool = False,
            path: str = "", thresholds: Sequence[float] | None = None,
            reject_below: float | None = None) -> dict[str, Any]:
        top = ranking(probs, class_names, top_k)
        label = top[0]["label"]
        if reject_below is not None and top[0]["probability"] < reject_below:
            label = UNKNOWN
        return {"path": path, "label": label, "probability": top[0]["probability"], "top_k": top,
                "calibrated": calibrated, "error": ""}

    def reject(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "label": UNKNOWN}  # top_k still ranks the classes

    def error_row(self, path: str, error: str, calibrated: bool = False) -> dict[str, Any]:
        return {"path": path, "label": "", "probability": None, "top_k": [], "calibrated": calibrated,
                "error": error}

    def csv_columns(self, class_names: Sequence[str]) -> list[str]:
        return ["label", "probability"]

    def csv_cells(self, row: dict[str, Any], class_names: Sequence[str], delim: str = " ") -> list[str]:
        return [row["label"], "" if row["probability"] is None else f"{row['probability']:.6f}"]

    def card_inference(self, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
        return {}

    def check_thresholds(self, thresholds: Any, num_classes: int) -> str:
        return "" if thresholds is None else "inference.thresholds belong to a multi-label model (task 'multi')"

    def check_options(self, reject_below: float | None = None, threshold: float | None = None) -> str:
        if threshold is not None:
            return "--threshold is for multi-label models; a single-label model takes --reject-below"
        return ""

    def answer_text(self, row: dict[str, Any]) -> str:
        return row["label"]

    def serve_info(self, class_names: Sequence[str], thresholds: Sequence[float]) -> dict[str, Any]:
        return {}

    def readme_phrases(self, calibrated: bool = False) -> dict[str, Any]:
        return {"tags": [], "use": "assigns each image one of these classes"
                + (", with calibrated probabilities" if calibrated else ""),
                "caveat": ", unless `--reject-below` turns low-confidence answers into `unknown`."}

    agreement_words = "top-1 agreement"
    headline_bounded_by_agreement = True  # an image's accuracy changes only where its top-1 decision does

    def head(self, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / temperature, dim=1)

    def distillation(self, logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        target = nn.functional.softmax(teacher_logits / temperature, dim=1)
        return nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=1), target,
                                    reduction="batchmean")

    def hf_config(self, thresholds: Sequence[float], temperature: float) -> dict[str, Any]:
        return {}  # transformers' default problem_type: one class per image, the argmax

    description = "one class per image"

    def mixup_options(self, label_smoothing: float) -> dict[str, Any]:
        return {"label_smoothing": label_smoothing, "multi_label": False}
