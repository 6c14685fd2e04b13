"""Transfer-learning strategies, picked by name from one registry.

- ``finetune``: head warm-up on the frozen body for ``freeze_epochs`` (on cached features), then
  every layer, with the body at ``lr / lr_mult`` (discriminative learning rates).
- ``progressive``: after the same warm-up, timm's layer groups are unfrozen from the top down,
  one every ``unfreeze_every`` epochs, with layer-wise learning rates rising geometrically from
  ``lr / lr_mult`` at the stem.
- ``linear-probe``: frozen backbone, features computed once, a new linear/logistic/SVM head.
- ``scratch``: random initialisation, every layer trained at ``lr``.
"""

from __future__ import annotations

from typing import Callable

from ..models.groups import body_groups
from .callbacks import FreezeSchedule, start_metrics_file
from .context import TrainContext
from .features import cached_features, fit_linear_probe, train_head
from .lightning_fit import fit_lightning
from .module import resolve_lr


# Passes over the cached features per warm-up epoch: fitting the head well before the body moves
# (linear probe, then fine-tune) protects the pretrained features, and costs milliseconds.
WARMUP_PASSES_PER_EPOCH = 10


def frozen_warmup(ctx: TrainContext) -> tuple[int, float | None]:
    """Train the head alone for ``freeze_epochs`` on cached backbone features.

    The frozen body maps each image to fixed features (BatchNorm in eval mode), so computing them
    once replaces ``freeze_epochs`` full forward passes. Returns (epochs done, best val accuracy).
    Skipped on resume: the head's warm-up weights are in the checkpoint.
    """
    cfg = ctx.cfg
    epochs = min(cfg.freeze_epochs, cfg.epochs)
    if epochs == 0 or ctx.resume_ckpt:
        return (epochs if ctx.resume_ckpt else 0), None
    print(f"epochs 1-{epochs}: training the head on cached features of the frozen body")
    train_x, train_y = cached_features(ctx, ctx.splits.train, cfg.cached_views)
    val_x, val_y = cached_features(ctx, ctx.splits.val, 1)
    start_metrics_file(ctx.run_dir / "metrics.csv")
    head = ctx.model.get_submodule(ctx.arch.head)
    best = train_head(ctx, head, train_x, train_y, val_x[:, 0], val_y, epochs, save_best=True,
                      passes_per_epoch=WARMUP_PASSES_PER_EPOCH)
    return epochs, best


def _finetune(ctx: TrainContext) -> None:
    done, best = frozen_warmup(ctx)
    if done >= ctx.cfg.epochs:
        return
    groups = [[n for g in body_groups(ctx.model, ctx.arch.head) for n in g]]
    body_lr = resolve_lr(ctx.cfg) / ctx.cfg.lr_mult
    fit_lightning(ctx, groups, [body_lr], None, epoch_offset=done, best=best)


def _progressive(ctx: TrainContext) -> None:
    cfg = ctx.cfg
    done, best = frozen_warmup(ctx)
    if done >= cfg.epochs:
        return
    groups = body_groups(ctx.model, ctx.arch.head)
    n = len(groups)
    every = cfg.unfreeze_every or max(1, (cfg.epochs - done) // (n + 1))
    head_lr = resolve_lr(cfg)
    # stem gets lr / lr_mult, the top body group nearly the head's lr (fastai-style slice)
    lrs = [head_lr / cfg.lr_mult ** ((n - i) / n) for i in range(n)]
    fit_lightning(ctx, groups, lrs, FreezeSchedule(lambda epoch: 1 + epoch // every), epoch_offset=done, best=best)


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
