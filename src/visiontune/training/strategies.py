"""Transfer-learning strategies (registered in :data:`visiontune.training.registry.STRATEGIES`).

- ``finetune``: head warm-up on the frozen body for ``freeze_epochs`` (on cached features), then
  every layer but ``freeze_bottom`` bottom groups (none by default), with the body at ``lr / lr_mult``
  (discriminative learning rates).
- ``progressive``: after the same warm-up, timm's layer groups are unfrozen from the top down,
  one every ``unfreeze_every`` epochs, with layer-wise learning rates rising geometrically from
  ``lr / lr_mult`` at the stem (the freezing policy is the :class:`FreezeSchedule` callback).
- ``linear-probe``: frozen backbone, features computed once, a new head (:mod:`.probe`).
- ``scratch``: random initialisation, every layer trained at ``lr``.

Each takes the run's :class:`~visiontune.training.context.TrainContext` and returns a
:class:`~visiontune.training.context.FitResult`; the warm-up and the fine-tuning are two fits of
the same loop (:func:`~visiontune.training.lightning_fit.run_fit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.memory import MemoryEvalSet
from ..models.groups import body_groups, bottom_parameter_names
from .budget import warmup_images
from .callbacks import FreezeSchedule
from .checkpoint_io import HEAD_PHASE, checkpoint_phase
from .context import FitResult, TrainContext
from .lightning_fit import fit_head, fit_lightning
from .probe import cached_features

# Passes over the cached features per warm-up epoch: fitting the head well before the body moves
# (linear probe, then fine-tune) protects the pretrained features, and costs milliseconds.
WARMUP_PASSES_PER_EPOCH = 10


@dataclass
class Warmup:
    """How the frozen warm-up ended: epochs it covers, its best validation score, whether the time
    budget ran out in it, and its timings."""

    epochs: int = 0
    best: float | None = None
    out_of_time: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def frozen_warmup(ctx: TrainContext) -> Warmup:
    """Train the head alone for ``freeze_epochs`` on cached backbone features, then load its best epoch.

    The frozen body maps each image to fixed features (BatchNorm in eval mode), so computing them
    once replaces ``freeze_epochs`` full forward passes; of about
    :func:`~visiontune.training.budget.warmup_images` training images, each class in its share (the
    head only starts the fine-tune). A run resumed from a checkpoint of the warm-up continues it;
    one resumed from a checkpoint of the fine-tuning skips it (the head's warm-up weights are in that
    checkpoint).
    """
    cfg = ctx.cfg
    epochs = min(cfg.strategy.freeze_epochs, cfg.optim.epochs)
    if epochs == 0:
        return Warmup()
    if ctx.resume_ckpt and checkpoint_phase(ctx.resume_ckpt) != HEAD_PHASE:
        return Warmup(epochs)
    limit = warmup_images(len(ctx.splits.train), len(ctx.splits.class_names))
    print(f"epochs 1-{epochs}: training the head on cached features of the frozen body"
          + (f" (about {limit} of the {len(ctx.splits.train)} training images, each class in its share)"
             if limit < len(ctx.splits.train) else ""))
    features, seconds = cached_features(ctx, limit)
    outcome = fit_head(ctx, features, epochs, WARMUP_PASSES_PER_EPOCH, warmup=True, resume=ctx.resume_ckpt)
    if outcome.best_state is not None:  # the fine-tuning starts from the warm-up's best head, not its last
        ctx.classifier.load_state_dict(outcome.best_state)
    return Warmup(epochs, outcome.best, outcome.out_of_time, {"features": seconds})


def _body_resume(ctx: TrainContext) -> Path | None:
    """The checkpoint the fine-tuning continues from: the run's, unless it is the warm-up's."""
    return ctx.resume_ckpt if ctx.resume_ckpt and checkpoint_phase(ctx.resume_ckpt) != HEAD_PHASE else None


def _all_body(ctx: TrainContext) -> list[list[str]]:
    return [[n for g in body_groups(ctx.model, ctx.arch.classifier) for n in g]]


def finetune(ctx: TrainContext) -> FitResult:
    warm = frozen_warmup(ctx)
    if warm.epochs >= ctx.cfg.optim.epochs or warm.out_of_time:
        return FitResult(warm.best, warm.timings)
    body_lr = ctx.optimizer_settings().peak_lr / ctx.cfg.strategy.lr_mult
    groups = _bottom_frozen(ctx)
    outcome = fit_lightning(ctx, groups, [body_lr] * len(groups), None, epoch_offset=warm.epochs,
                            best=warm.best, resume=_body_resume(ctx))
    return FitResult(outcome.best, warm.timings)


def _bottom_frozen(ctx: TrainContext) -> list[list[str]]:
    """The fine-tune's body groups: the bottom ``--freeze-bottom`` groups, frozen here for the whole
    fit, and the rest, which trains.

    Frozen bottom groups need no gradient, so the backward pass stops above them (on
    EfficientNet-Lite0 at 96 px, freezing the stem and the first two blocks trained 28-37% more
    images a second side by side; each step learned less, bench/RESULTS.md "Frozen bottom layers").
    The flags are set before the trainer starts, not by a callback: a distributed run wraps the model
    with the flags it finds, and a run resumed mid-epoch gets no epoch start to set them. Their
    BatchNorm layers stay in eval mode (:meth:`~visiontune.training.module.ClassifierModule.train`)."""
    count = ctx.cfg.strategy.freeze_bottom
    bottom = set(bottom_parameter_names(ctx.model, ctx.arch.classifier, count))
    body = _all_body(ctx)[0]
    for name, p in ctx.model.named_parameters():
        if name in body:
            p.requires_grad_(name not in bottom)
    if not bottom:
        return [body]
    print(f"fine-tuning: the bottom {count} layer group(s) of the body stay frozen "
          f"({len(bottom)} of {len(body)} parameter tensors)")
    return [[n for n in body if n in bottom], [n for n in body if n not in bottom]]


def progressive(ctx: TrainContext) -> FitResult:
    s = ctx.cfg.strategy
    warm = frozen_warmup(ctx)
    if warm.epochs >= ctx.cfg.optim.epochs or warm.out_of_time:
        return FitResult(warm.best, warm.timings)
    groups = body_groups(ctx.model, ctx.arch.classifier)
    n = len(groups)
    every = s.unfreeze_every or max(1, (ctx.cfg.optim.epochs - warm.epochs) // (n + 1))
    head_lr = ctx.optimizer_settings().peak_lr
    # stem gets lr / lr_mult, the top body group nearly the head's lr (fastai-style slice)
    lrs = [head_lr / s.lr_mult ** ((n - i) / n) for i in range(n)]
    outcome = fit_lightning(ctx, groups, lrs, FreezeSchedule(lambda epoch: 1 + epoch // every),
                            epoch_offset=warm.epochs, best=warm.best, resume=_body_resume(ctx))
    return FitResult(outcome.best, warm.timings)


# training images a data-dependent first layer is set from (a 2x2 patch covariance: 5,000 images
# give 4.8 million patches; decoding them takes ~2 s)
DATA_INIT_IMAGES = 5000


def data_init(ctx: TrainContext) -> None:
    """Set the layers of a network that are computed from the training images before it trains
    (:meth:`~visiontune.models.lowres.LowResCNN.fit_whitening`); nothing for other networks, or
    on resume (the checkpoint holds them)."""
    fit = getattr(ctx.model, "fit_whitening", None)
    if fit is None or ctx.resume_ckpt:
        return
    train = ctx.splits.train
    images = MemoryEvalSet(train[:: max(1, len(train) // DATA_INIT_IMAGES)][:DATA_INIT_IMAGES], ctx.preprocessing)
    fit(torch.stack([images[i][0] for i in range(len(images))]))


def scratch(ctx: TrainContext) -> FitResult:
    data_init(ctx)
    outcome = fit_lightning(ctx, _all_body(ctx), [ctx.optimizer_settings().peak_lr], None, resume=ctx.resume_ckpt)
    return FitResult(outcome.best)
