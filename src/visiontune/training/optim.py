"""One optimizer factory and one LR schedule for every trainer (Lightning fit, cached-feature
heads, pruning recovery).

Example:
    >>> settings = OptimizerSettings("sgd", lr=0.1)
    >>> opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], settings)
    >>> type(opt).__name__, opt.defaults["nesterov"]
    ('SGD', True)
    >>> factor = schedule_fn(ScheduleSettings("cosine", epochs=2), total_steps=10, steps_per_epoch=5)
    >>> factor(0), round(factor(10), 3)
    (1.0, 0.01)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .registry import DEFAULT_LR, OPTIMIZERS, SCHEDULES

MIN_LR_FACTOR = 0.01  # cosine ends at 1% of the peak, so the last epoch still learns


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimizer needs: its name (:data:`OPTIMIZERS`), peak LR, weight decay, momentum."""

    name: str = "adamw"
    lr: float | None = None  # None: the optimizer's default (DEFAULT_LR)
    weight_decay: float = 0.01
    momentum: float = 0.9

    @property
    def peak_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.name]


@dataclass(frozen=True)
class ScheduleSettings:
    """LR multiplier over the run: warm-up, then cosine, step or constant."""

    name: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 3
    epochs: int = 1
    max_steps: int | None = None  # the schedule ends here when the fit stops early (a partial last epoch)


def make_optimizer(params: Iterable[Any], settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The optimizer named in ``settings`` over ``params`` (tensors or param-group dicts).

    Adam and AdamW run fused (one kernel over every parameter) where all parameters are floating
    point on the CPU or a CUDA GPU: the same update, and 2-5% more training steps a second for
    EfficientNet-Lite0 at 96 px on 2 CPU cores, whose per-parameter loop of small operations the
    fused kernel replaces (bench/RESULTS.md, "The training step")."""
    cls = OPTIMIZERS.get(settings.name)
    # read once: a generator (model.parameters(), or a group's) checked here would reach the optimizer empty
    params = [{**p, "params": list(p["params"]) if not isinstance(p["params"], torch.Tensor) else [p["params"]]}
              if isinstance(p, dict) else p for p in params]
    extra: dict[str, Any] = {"momentum": settings.momentum, "nesterov": True} if settings.name == "sgd" else {}
    if settings.name in FUSABLE and all(_fusable(p) for p in _tensors(params)):
        extra["fused"] = True
    return cls(params, lr=settings.peak_lr, weight_decay=settings.weight_decay, **extra)


FUSABLE = ("adam", "adamw")


def _tensors(params: list[Any]) -> Iterator[torch.Tensor]:
    for p in params:
        if isinstance(p, dict):
            yield from p["params"]
        else:
            yield p


def _fusable(p: torch.Tensor) -> bool:
    return p.is_floating_point() and p.device.type in ("cpu", "cuda")


def schedule_fn(settings: ScheduleSettings, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then cosine, step (x0.1) or constant."""
    SCHEDULES.check(settings.name)
    warmup = int(settings.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings.name == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if settings.name == "step":
            return 0.1 ** ((step // steps_per_epoch) // max(1, settings.step_size))
        return 1.0

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, settings: ScheduleSettings, total_steps: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(settings, total_steps, steps_per_epoch))
