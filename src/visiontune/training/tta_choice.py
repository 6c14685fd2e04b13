"""``--tta auto``: whether a model's predictions should average two views, measured on its val split.

Test-time augmentation costs every prediction the model will ever make (``flip-zoom``: 2.3-2.8x
one view), so a run does not adopt it by default: ``auto`` (what a planned fine-tune of single-label
data uses) validates with one view during training, then measures :data:`AUTO_TTA` against one
view on the val split and keeps it only where it gains at least :data:`TTA_MIN_GAIN` accuracy.
The end of training reads the val images once with both views kept apart
(:meth:`~visiontune.inference.classifier.Classifier.view_taps`): the first view's logits are the
one-view figure, and the second view's cost is what the plan pays for.

Example:
    >>> validation_tta("auto"), validation_tta("flip"), validation_tta(None), final_tta("auto")
    ('', 'flip', '', 'flip-zoom')
    >>> y = torch.tensor([0, 1, 1, 0])
    >>> plain = torch.tensor([[2., 0.], [1., 0.], [0., 1.], [1., 0.]])  # 3 of 4 right
    >>> second = torch.tensor([[2., 0.], [0., 3.], [0., 1.], [1., 0.]])  # the second view puts image 1 right
    >>> choice = choose(plain, second, y, side=96)
    >>> choice.mode, choice.accuracy, choice.gain, choice.cost
    ('flip-zoom', 1.0, 0.25, 2.78)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.tta import tta_mode, view_cost
from .registry import AUTO_TTA

AUTO = "auto"
# the least val accuracy the second view must add to be kept: below it the doubled cost of every
# prediction buys noise. On CIFAR-10's held-out images flip-zoom added 0.80 points to the 15-minute model
# and 0.62 to the 30-minute one (bench/RESULTS.md, "Test-time augmentation")
TTA_MIN_GAIN = 0.002


def validation_tta(value: str | bool | None) -> str:
    """The views training validates with (and the card holds before an ``auto`` choice): ``--tta``'s
    mode, one view for ``auto`` or unset."""
    return "" if value in (None, AUTO) else tta_mode(value)


def final_tta(value: str | bool | None) -> str:
    """The views the end of the run pays for at most: ``auto`` may adopt :data:`AUTO_TTA`."""
    return AUTO_TTA if value == AUTO else validation_tta(value)


def why_one_view(single_label: bool, n_val: int) -> str:
    """Why ``auto`` cannot measure the second view on this data ("" where it measures): it needs a
    single-label task (the views are compared by accuracy) and a val split to compare them on. The
    run's choice, the forecast and the planner all ask this one question.

    Example:
        >>> why_one_view(True, 200), why_one_view(True, 0), why_one_view(False, 200)
        ('', 'no val split to measure it on', 'measured on single-label models only')
    """
    if not n_val:
        return "no val split to measure it on"
    return "" if single_label else "measured on single-label models only"


def finish_views(value: str | bool | None, side: int) -> float:
    """Forward passes per val image at the end of a run at ``side`` px (one view, plus the second
    view ``auto`` measures, equals the cost of the mode it may adopt)."""
    return view_cost(final_tta(value), side)


@dataclass
class TtaChoice:
    """What ``auto`` measured: the mode kept (``""``: one view) and the val accuracies."""

    mode: str
    accuracy: float       # of the kept mode
    plain: float          # of one view
    gain: float           # AUTO_TTA's accuracy minus one view's
    images: int
    cost: float           # AUTO_TTA's forward passes per prediction, in units of one view

    def to_dict(self) -> dict[str, float | int | str]:
        """What the model card's ``training.tta_choice`` records."""
        return {"mode": self.mode or "none", "measured": AUTO_TTA, "accuracy": round(self.accuracy, 4),
                "one_view": round(self.plain, 4), "gain": round(self.gain, 4), "images": self.images,
                "cost": self.cost}

    def line(self) -> str:
        kept = (f"{self.mode} kept ({self.cost:g}x the cost of one view per prediction)" if self.mode
                else f"one view kept ({AUTO_TTA} gained less than {TTA_MIN_GAIN:.1%})")
        return (f"test-time augmentation (auto): {AUTO_TTA} {self.plain + self.gain:.4f} against one view "
                f"{self.plain:.4f} on {self.images} val images: {kept}")


def choose(plain: torch.Tensor, second: torch.Tensor, targets: torch.Tensor, side: int) -> TtaChoice:
    """The choice from the val logits of one view and of :data:`AUTO_TTA`'s second view (``[N, C]``
    each), the class indices ``targets`` and the model's input side (px)."""
    one = (plain.argmax(1) == targets).float().mean().item()
    both = (((plain + second) / 2).argmax(1) == targets).float().mean().item()
    gain = both - one
    mode = AUTO_TTA if gain >= TTA_MIN_GAIN else ""
    return TtaChoice(mode, both if mode else one, one, gain, len(targets), view_cost(AUTO_TTA, side))
