"""Transfer-learning strategies, picked by name from one registry.

- ``finetune``: head warm-up on a frozen body for ``freeze_epochs``, then every layer, with the
  body at ``lr / lr_mult`` (discriminative learning rates).
- ``progressive``: timm's layer groups unfrozen from the top down, one every ``unfreeze_every``
  epochs, with layer-wise learning rates rising geometrically from ``lr / lr_mult`` at the stem.
- ``linear-probe``: frozen backbone, features computed once, a new linear/logistic/SVM head.
- ``scratch``: random initialisation, every layer trained at ``lr``.
"""

from __future__ import annotations

from typing import Callable

from ..models.groups import body_groups
from .callbacks import FreezeSchedule
from .context import TrainContext
from .features import fit_linear_probe
from .lightning_fit import fit_lightning
from .module import resolve_lr


def _finetune(ctx: TrainContext) -> None:
    cfg = ctx.cfg
    groups = [[n for g in body_groups(ctx.model, ctx.arch.head) for n in g]]
    freeze = FreezeSchedule(lambda epoch: 0 if epoch < cfg.freeze_epochs else 1) if cfg.freeze_epochs > 0 else None
    body_lr = resolve_lr(cfg) / cfg.lr_mult
    fit_lightning(ctx, groups, [body_lr], freeze)


def _progressive(ctx: TrainContext) -> None:
    cfg = ctx.cfg
    groups = body_groups(ctx.model, ctx.arch.head)
    n = len(groups)
    every = cfg.unfreeze_every or max(1, (cfg.epochs - cfg.freeze_epochs) // (n + 1))
    head_lr = resolve_lr(cfg)
    # stem gets lr / lr_mult, the top body group nearly the head's lr (fastai-style slice)
    lrs = [head_lr / cfg.lr_mult ** ((n - i) / n) for i in range(n)]

    def trainable(epoch: int) -> int:
        return 0 if epoch < cfg.freeze_epochs else 1 + (epoch - cfg.freeze_epochs) // every

    fit_lightning(ctx, groups, lrs, FreezeSchedule(trainable))


def _scratch(ctx: TrainContext) -> None:
    groups = [[n for g in body_groups(ctx.model, ctx.arch.head) for n in g]]
    fit_lightning(ctx, groups, [resolve_lr(ctx.cfg)], None)


STRATEGIES: dict[str, Callable[[TrainContext], None]] = {
    "finetune": _finetune,
    "linear-probe": fit_linear_probe,
    "progressive": _progressive,
    "scratch": _scratch,
}

# Strategies that start from random weights whatever --weights says.
RANDOM_INIT = {"scratch"}
