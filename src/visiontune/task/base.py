"""The :class:`Task` interface: what a kind of answer (single-label, multi-label, ...) defines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

UNKNOWN = "unknown"  # the label of a single-label prediction rejected by reject_below

#: One image's label: a class index (single-label) or a multi-hot float vector ``[C]`` (multi-label).
Label = int | torch.Tensor


def ranking(probs: torch.Tensor, class_names: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` most probable classes of a probability vector ``[C]``, best first."""
    values, idx = probs.topk(max(1, min(top_k, len(class_names))))
    return [{"label": class_names[i], "probability": float(v)} for v, i in zip(values.tolist(), idx.tolist())]


def as_float(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits (float64 kept: calibration fits in double precision)."""
    return logits if logits.dtype == torch.float64 else logits.float()


class Task:
    """A kind of classification. Subclasses fill in every method; see :mod:`visiontune.task`.

    Attributes:
        name: the key in ``model.json`` (``inference.task``) and in ``--task``.
        title: how messages and reports name it ("single-label").
        activation: how logits become probabilities, in words (recorded with exports).
        default_selection: the ``--select-metric`` a run of this task selects by by default.
        headline: the name of the figure compress guards ("accuracy").
        score_key: that figure's column in compress's table ("val_accuracy").
        change_key: the column of a variant's change of that figure, in points.
        agreement_key: the name of the share of decisions two models agree on.
        decision_words: what one decision is called, plural ("top-1 decisions").
        hf_problem_type: transformers' ``problem_type`` of an exported config (None: its default).
        selection_metrics: the ``--select-metric`` values this task computes besides accuracy.
        pseudo_labels: whether ``train --unlabeled`` can pseudo-label images for it.
    """

    name: str = ""
    title: str = ""
    activation: str = ""
    default_selection: str = "accuracy"
    headline: str = "accuracy"
    score_key: str = "val_accuracy"
    change_key: str = "accuracy_change_pts"
    agreement_key: str = "top1_agreement"
    decision_words: str = ""
    hf_problem_type: str | None = None
    selection_metrics: tuple[str, ...] = ()
    pseudo_labels: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # --- labels and targets -------------------------------------------------------------------
    def owns(self, label: Label) -> bool:
        """Whether ``label`` is a label of this task's kind."""
        raise NotImplementedError

    def targets(self, labels: Sequence[Label], num_classes: int) -> torch.Tensor:
        """The training targets of ``labels``, stacked."""
        raise NotImplementedError

    def indices(self, label: Label) -> list[int]:
        """The classes present in one label."""
        raise NotImplementedError

    def counts(self, labels: Sequence[Label], num_classes: int) -> torch.Tensor:
        """Images per class ``[C]`` (float): an image counts once for each class it has."""
        out = torch.zeros(num_classes)
        for label in labels:
            out[self.indices(label)] += 1.0
        return out

    # --- training ------------------------------------------------------------------------------
    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> nn.Module:
        """The training loss (``class_weights`` from ``--balance weights``)."""
        raise NotImplementedError

    def soft_loss(self, loss_fn: nn.Module, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """The loss of mixed (mixup/cutmix) soft targets."""
        raise NotImplementedError

    def plain_loss(self, logits: torch.Tensor, target: torch.Tensor) -> float:
        """The unweighted loss (for logging validation)."""
        raise NotImplementedError

    def accuracy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The accuracy of logits against targets, a 0-dim tensor on their device (a training step
        sums it without waiting for the device)."""
        raise NotImplementedError

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What torchmetrics' metrics of this task take: (scores, targets)."""
        return logits, target

    def metrics(self, num_classes: int) -> dict[str, Any]:
        """Fresh torchmetrics: ``accuracy`` and one per name in :attr:`selection_metrics`."""
        raise NotImplementedError

    def score(self, metric: str, logits: torch.Tensor, target: torch.Tensor) -> float:
        """The ``--select-metric`` value ``metric`` of validation logits."""
        raise NotImplementedError

    def class_weights(self, counts: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Loss weights of ``--balance weights`` from the training images per class."""
        raise NotImplementedError

    def sample_weights(self, labels: Sequence[Label], counts: torch.Tensor) -> torch.Tensor:
        """Per-sample draw weights of ``--balance sampler`` (float64)."""
        raise NotImplementedError

    # --- prediction ----------------------------------------------------------------------------
    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Probabilities of logits at a calibration ``temperature`` (float32, or float64 if given)."""
        raise NotImplementedError

    def decide(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        """The decisions made from probabilities ``[N, C]`` (what two models must agree on)."""
        raise NotImplementedError

    def uncertainty(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        """How close each image ``[N, C]`` is to a different decision, ``[N]`` in [0, 1] (1: a tie):
        what ``visiontune suggest`` ranks the images to label next by."""
        raise NotImplementedError

    def uncertainty_reason(self, probs: torch.Tensor, class_names: Sequence[str],
                           thresholds: Sequence[float] | None = None) -> str:
        """One image's :meth:`uncertainty` in words (``"cat 0.41 vs dog 0.38"``)."""
        raise NotImplementedError

    def gradient_if_decided(self, probs: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        """The loss's gradient at the logits ``[N, C]`` were each image labelled as the model decides
        (its probabilities minus the decision's targets): times the features, the last layer's
        gradient that ``visiontune suggest --method badge`` embeds. Large where the model is unsure."""
        raise NotImplementedError

    def decisions_per_image(self, num_classes: int) -> int:
        return int(self.decide(torch.zeros(1, num_classes)).numel())

    def agreement(self, logits: torch.Tensor, reference: torch.Tensor, temperature: float = 1.0,
                  thresholds: Sequence[float] | None = None) -> float:
        """The share of decisions ``logits`` make as ``reference`` does."""
        a = self.decide(self.probabilities(logits, temperature), thresholds)
        b = self.decide(self.probabilities(reference, temperature), thresholds)
        return float((a == b).float().mean())

    def headline_score(self, probs: torch.Tensor, target: torch.Tensor) -> float:
        """The :attr:`headline` figure of probabilities against targets."""
        raise NotImplementedError

    def row(self, probs: torch.Tensor, class_names: Sequence[str], top_k: int = 5, calibrated: bool = False,
            path: str = "", thresholds: Sequence[float] | None = None,
            reject_below: float | None = None) -> dict[str, Any]:
        """One prediction row from a probability vector ``[C]`` (see :mod:`visiontune.inference.rows`)."""
        raise NotImplementedError

    def reject(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row of an image the model's unknown-score rejects: no class of this model."""
        raise NotImplementedError

    def error_row(self, path: str, error: str, calibrated: bool = False) -> dict[str, Any]:
        """The row of an input that could not be read."""
        raise NotImplementedError

    def csv_columns(self, class_names: Sequence[str]) -> list[str]:
        """The predictions CSV's columns before the top-k ones (after ``path``)."""
        raise NotImplementedError

    def csv_cells(self, row: dict[str, Any], class_names: Sequence[str], delim: str = " ") -> list[str]:
        """A row's cells under :meth:`csv_columns`."""
        raise NotImplementedError

    # --- the model card ------------------------------------------------------------------------
    def card_inference(self, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
        """What ``model.json``'s ``inference`` section records of this task."""
        raise NotImplementedError

    def check_thresholds(self, thresholds: Any, num_classes: int) -> str:
        """Why ``inference.thresholds`` of a model.json is wrong for this task ('' if right)."""
        raise NotImplementedError

    # --- prediction options, serving and the README --------------------------------------------
    def check_options(self, reject_below: float | None = None, threshold: float | None = None) -> str:
        """Why prediction options are wrong for this task ('' if right): ``reject_below`` (the top
        probability under which a label is ``unknown``) and ``threshold`` (one decision threshold
        for every label) are each refused, naming the other, by the task that does not take it."""
        raise NotImplementedError

    def answer_text(self, row: dict[str, Any]) -> str:
        """The row's answer (its label, or its labels) as one string: an element of the Open
        Inference Protocol's ``labels``."""
        raise NotImplementedError

    def serve_info(self, class_names: Sequence[str], thresholds: Sequence[float]) -> dict[str, Any]:
        """What the serving API's ``/v1/model`` reports of this task besides its name."""
        raise NotImplementedError

    def readme_phrases(self, calibrated: bool = False) -> dict[str, Any]:
        """The task's wording in the model's ``README.md``: ``tags`` (Hub tags added to
        image-classification's), ``use`` (what the model does with an image) and ``caveat`` (the end
        of the sentence saying that other images get one of its classes anyway)."""
        raise NotImplementedError

    # --- export, parity and compress -----------------------------------------------------------
    #: How the export parity check's messages name the share of agreeing decisions ("top-1 agreement").
    agreement_words: str = ""
    #: Whether the :attr:`headline` figure on a set of images drops by at most the share of decisions
    #: that changed there (accuracy does; mAP, which ranks probabilities, does not): compress's int8
    #: guard then reads the agreement on every image at hand rather than the labelled val change alone.
    headline_bounded_by_agreement: bool = False

    def head(self, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """The ``probabilities`` output of an exported graph from logits ``[N, C]`` and a temperature tensor.

        :meth:`probabilities` in tensor operations only (no Python float, no dtype test), so that
        ``torch.jit.trace`` and the ONNX exporter record it as nodes of the graph.
        """
        raise NotImplementedError

    def distillation(self, logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The divergence of ``logits`` from a teacher's, both softened by ``temperature``: the
        knowledge-distillation term of pruning's recovery fine-tune (before its ``temperature**2``)."""
        raise NotImplementedError

    def hf_config(self, thresholds: Sequence[float], temperature: float) -> dict[str, Any]:
        """What an exported timm / Hugging Face ``config.json`` records of this task besides the label names."""
        raise NotImplementedError

    # --- training options ----------------------------------------------------------------------
    #: What ``--task NAME`` means, in words (the CLI's help of ``--task``).
    description: str = ""

    def mixup_options(self, label_smoothing: float) -> dict[str, Any]:
        """The target options of timm's ``Mixup`` for this task's targets: the ``label_smoothing`` it
        applies to mixed targets and ``multi_label`` (whether targets are dense ``[B, C]`` already)."""
        raise NotImplementedError
