"""Transfer-learning strategies (registered in :data:`visiontune.training.registry.STRATEGIES`).

- ``finetune``: head warm-up on the frozen body for ``freeze_epochs`` (on cached features), then
  every layer, with the body at ``lr / lr_mult`` (discriminative learning rates).
- ``progressive``: after the same warm-up, timm's layer groups are unfrozen from the top down,
  one every ``unfreeze_every`` epochs, with layer-wise learning rates rising geometrically from
  ``lr / lr_mult`` at the stem (the freezing policy is the :class:`FreezeSchedule` callback).
- ``linear-probe``: frozen backbone, features computed once, a new head (:mod:`.probe`).
- ``scratch``: random initialisation, every layer trained at ``lr``.
"""

from __future__ import annotations

import time

from ..models.groups import body_groups
from .callbacks import FreezeSchedule
from .context import TrainContext
from .lightning_fit import fit_lightning
from .metrics import MetricsLog
from .probe import train_head

# Passes over the cached features per warm-up epoch: fitting the head well before the body moves
# (linear probe, then fine-tune) protects the pretrained features, and costs milliseconds.
WARMUP_PASSES_PER_EPOCH = 10


def frozen_warmup(ctx: TrainContext) -> tuple[int, float | None]:
    """Train the head alone for ``freeze_epochs`` on cached backbone features.

    The frozen body maps each image to fixed features (BatchNorm in eval mode), so computing them
    once replaces ``freeze_epochs`` full forward passes. Returns (epochs done, best val score).
    Skipped on resume: the head's warm-up weights are in the checkpoint.
    """
    cfg = ctx.cfg
    epochs = min(cfg.strategy.freeze_epochs, cfg.optim.epochs)
    if epochs == 0 or ctx.resume_ckpt:
        return (epochs if ctx.resume_ckpt else 0), None
    print(f"epochs 1-{epochs}: training the head on cached features of the frozen body")
    began = time.time()
    extractor = ctx.feature_extractor()
    train_x, train_y, _ = extractor.features(ctx.splits.train, cfg.strategy.cached_views, cfg.data.augment)
    val_x, val_y, _ = extractor.features(ctx.splits.val)
    ctx.timings["features"] = time.time() - began
    MetricsLog(ctx.layout.metrics_csv, cfg.optim.epochs).start()
    best = train_head(ctx, ctx.classifier, train_x, train_y, val_x[:, 0], val_y, epochs, save_best=True,
                      passes_per_epoch=WARMUP_PASSES_PER_EPOCH)
    return epochs, best


def _all_body(ctx: TrainContext) -> list[list[str]]:
    return [[n for g in body_groups(ctx.model, ctx.arch.classifier) for n in g]]


def finetune(ctx: TrainContext) -> None:
    done, best = frozen_warmup(ctx)
    if done >= ctx.cfg.optim.epochs:
        return
    body_lr = ctx.optimizer_settings().peak_lr / ctx.cfg.strategy.lr_mult
    fit_lightning(ctx, _all_body(ctx), [body_lr], None, epoch_offset=done, best=best)


def progressive(ctx: TrainContext) -> None:
    s = ctx.cfg.strategy
    done, best = frozen_warmup(ctx)
    if done >= ctx.cfg.optim.epochs:
        return
    groups = body_groups(ctx.model, ctx.arch.classifier)
    n = len(groups)
    every = s.unfreeze_every or max(1, (ctx.cfg.optim.epochs - done) // (n + 1))
    head_lr = ctx.optimizer_settings().peak_lr
    # stem gets lr / lr_mult, the top body group nearly the head's lr (fastai-style slice)
    lrs = [head_lr / s.lr_mult ** ((n - i) / n) for i in range(n)]
    fit_lightning(ctx, groups, lrs, FreezeSchedule(lambda epoch: 1 + epoch // every), epoch_offset=done, best=best)


def scratch(ctx: TrainContext) -> None:
    fit_lightning(ctx, _all_body(ctx), [ctx.optimizer_settings().peak_lr], None)
