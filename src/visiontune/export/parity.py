"""The parity check: an export (or a compressed variant) against eager fp32 PyTorch.

Logits are compared on the same preprocessed batch; the decisions compared are the model's task's
(top-1, or every label at its threshold), and an export that disagrees beyond
:data:`MIN_AGREEMENT` or :data:`MAX_LOGIT_DIFF` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ExportError
from ..inference.runners import forward_logits
from ..models.card import ModelCard
from ..task import TASKS, Task, get_task

# Thresholds from issue 5: an export that disagrees more than this is refused.
MIN_AGREEMENT = 0.995
# the largest |logit difference| as a share of the largest |logit| (at least 1): the same test on
# every model. Random-init Inception v3 has logits of 7e7 whose float32 exports differ by 2e2
# (3e-6 of the scale, rounding), while a real mismatch differs by a sizeable share of the scale.
MAX_LOGIT_DIFF = 2e-4


@torch.inference_mode()
def eager_logits(model: nn.Module, batch: torch.Tensor, chunk: int = 32, tta: bool | str | None = None) -> np.ndarray:
    """fp32 PyTorch logits, the reference every export is compared with."""
    model = model.eval().float()
    return torch.cat([forward_logits(model, batch[i:i + chunk], tta) for i in range(0, len(batch), chunk)]).numpy()


def compare_logits(reference: np.ndarray, other: np.ndarray, card: ModelCard | None = None) -> dict[str, float]:
    """The agreement of the decisions of two [N, C] logit arrays and their max |logit difference|,
    absolute and relative to the reference's largest |logit| (at least 1).

    The decisions are the ``card``'s task's, made exactly as prediction makes them (a single-label
    model's top-1: ``top1_agreement``; a multi-label model's every label at its threshold:
    ``label_agreement``); without a card, top-1.

    Example:
        >>> reference = np.array([[2.0, 1.0], [0.0, 3.0]], dtype=np.float32)
        >>> compare_logits(reference, reference + np.float32(0.5))["top1_agreement"]
        1.0
    """
    largest = float(np.max(np.abs(reference - other)))
    scale = max(float(np.max(np.abs(reference))), 1.0)
    diff = {"max_abs_logit_diff": largest, "max_rel_logit_diff": largest / scale, "num_images": int(len(reference))}
    task, temperature, thresholds = ((card.task, card.temperature, card.thresholds) if card is not None
                                     else (get_task("single"), 1.0, None))
    agreement = task.agreement(torch.from_numpy(np.asarray(other)), torch.from_numpy(np.asarray(reference)),
                               temperature, thresholds)
    return {task.agreement_key: agreement, **diff}


@torch.inference_mode()
def unknown_parity(model: nn.Module, card: ModelCard, graph_file, batch: torch.Tensor) -> dict[str, Any]:
    """How an exported graph's ``unknown_score`` agrees with eager fp32's on ``batch``: the share of
    the same unknown decisions at the card's threshold (``unknown_agreement``) and the largest
    score difference relative to the largest score (at least 1). Empty for a model without a score
    or a format that carries none (TorchScript and hf are not read back here)."""
    from ..inference.runners import is_graph, load_graph
    from ..models.unknown import ScoredModel, score_of

    score = score_of(model, card)
    if score is None or not is_graph(graph_file):
        return {}
    reference = ScoredModel(model.eval().float(), card.architecture.classifier, score, card.tta)(batch)[:, -1]
    runner, _ = load_graph(graph_file)
    if not getattr(runner, "scores", False):
        return {"unknown_agreement": 0.0, "max_rel_score_diff": float("inf")}
    other = runner(batch)[:, -1]
    t = card.unknown_threshold
    largest = float((reference - other).abs().max())
    return {"unknown_agreement": float(((reference >= t) == (other >= t)).double().mean()),
            "max_rel_score_diff": largest / max(float(reference.abs().max()), 1.0)}


@dataclass(frozen=True)
class ValScore:
    """What compress measures and guards: the model's task's headline figure on val (accuracy, or
    a multi-label model's macro mAP) and the agreement of a variant's decisions with eager's (top-1,
    or every per-label decision); the names are the task's report columns."""

    card: ModelCard

    @property
    def task(self) -> Task:
        return self.card.task

    @property
    def key(self) -> str:
        return self.task.score_key

    @property
    def change(self) -> str:
        return self.task.change_key

    @property
    def agreement(self) -> str:
        return self.task.agreement_key

    @property
    def name(self) -> str:
        return self.task.headline

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The headline figure of val logits ``[N, C]`` against their targets (``Task.targets``)."""
        probs = self.task.probabilities(torch.from_numpy(np.asarray(logits)), self.card.temperature)
        return self.task.headline_score(probs, torch.from_numpy(np.asarray(labels)))

    def agree(self, logits: np.ndarray, reference: np.ndarray) -> float:
        return compare_logits(reference, logits, self.card)[self.agreement]


def parity_problems(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                    max_diff: float | None = MAX_LOGIT_DIFF) -> list[str]:
    """What makes an export disagree with eager beyond the thresholds (empty: it passes)."""
    problems = []
    task = _reported_task(report)
    if report[task.agreement_key] < min_agreement:
        problems.append(f"{task.agreement_words} {report[task.agreement_key]:.2%} < {min_agreement:.1%}")
    if max_diff is not None and report["max_rel_logit_diff"] > max_diff:
        problems.append(f"max |logit diff| {report['max_abs_logit_diff']:.2e} is {report['max_rel_logit_diff']:.1e} "
                        f"of the logits' scale > {max_diff:.0e}")
    if report.get("unknown_agreement", 1.0) < min_agreement:
        problems.append(f"unknown decisions agree on {report['unknown_agreement']:.2%} < {min_agreement:.1%}")
    return problems


def _reported_task(report: dict[str, Any]) -> Task:
    """The task whose decisions a parity report compared (:func:`compare_logits`), by its agreement key."""
    try:
        return next(task for task in TASKS.values() if task.agreement_key in report)
    except StopIteration:
        raise KeyError(f"the parity report has none of {[task.agreement_key for task in TASKS.values()]}") from None


def check_parity(report: dict[str, Any], min_agreement: float = MIN_AGREEMENT,
                 max_diff: float | None = MAX_LOGIT_DIFF) -> None:
    """Raise :class:`ExportError` when an export disagrees with eager beyond the thresholds."""
    problems = parity_problems(report, min_agreement, max_diff)
    if problems:
        raise ExportError(f"export parity check failed vs eager PyTorch on {report.get('source', 'images')}: "
                          + "; ".join(problems))


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for ``z`` = 1.96); (0, 1) for no trials.

    Example:
        >>> [round(x, 4) for x in wilson_interval(244, 245)]
        [0.9772, 0.9993]
    """
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
