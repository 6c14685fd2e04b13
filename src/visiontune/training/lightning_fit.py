"""The one training loop: a Lightning fit, of the whole network on images (finetune, progressive,
scratch) or of its classifier layer on cached features of the frozen body (the linear probe's
``--head linear`` and the frozen warm-up before fine-tuning).

Both go through :func:`run_fit`, so the deadline of a time budget, early stopping, EMA, the
checkpoints for ``--resume`` (``--checkpoint-every-steps`` included), the ``metrics.csv`` rows and
the best epoch's ``model/`` are one callback each, whatever trains.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, TQDMProgressBar
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.errors import ArtifactError, TrainingInterrupted
from ..core.hardware import DenseBF16, is_rank_zero
from ..data.dataset import ImageListDataset, default_workers, make_loader
from ..data.memory import MemoryEvalSet, MemoryImages, MemoryTrainSet, store_side
from ..data.sampling import EpochSampler
from ..data.transforms import eval_transform, tensor_train_transform, train_transform
from .budget import FINISH_FIXED_S, MAX_EPOCHS, Deadline, Forecast, Replan, early_step_cost
from .callbacks import EMA, BestModelSaver, FreezeSchedule, MetricsRecorder, StepLimit
from .checkpoint_io import HEAD_PHASE, AtomicCheckpointIO, FolderModelCheckpoint
from .context import TrainContext
from .module import ClassifierModule, HeadModule
from .tta_choice import validation_tta

LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class DenseBF16Precision(Precision):
    """Lightning's precision plugin for bf16-dense: training steps under
    :class:`~visiontune.core.hardware.DenseBF16`, validation, test and prediction in fp32."""

    @contextmanager
    def train_step_context(self) -> Iterator[None]:
        with DenseBF16():
            yield


def trainer_precision(precision: str) -> dict:
    """The ``L.Trainer`` keywords of a run's resolved ``precision``."""
    if precision == "bf16-dense":
        return {"plugins": [DenseBF16Precision()]}
    return {"precision": LIGHTNING_PRECISION[precision]}


class ImageDataModule(L.LightningDataModule):
    """Train/val image loaders; ``batch_size`` is an attribute so Lightning's tuner can scale it."""

    def __init__(self, ctx: TrainContext):
        super().__init__()
        cfg, pre = ctx.cfg, ctx.preprocessing
        self.batch_size = ctx.batch_size
        self.seed = cfg.runtime.seed
        self.workers = default_workers(cfg.data.workers)
        augment = cfg.data.augment
        if ctx.cache_images:  # decoded once; augmented in this process, no workers (see data/memory.py)
            self.workers = 0
            if augment in ("none", "light"):
                self.train_set = MemoryEvalSet(ctx.splits.train, pre, flip=augment == "light", seed=self.seed)
            else:
                images = MemoryImages([p for p, _ in ctx.splits.train], store_side(pre, augment), pre.draft_size())
                self.train_set = MemoryTrainSet(ctx.splits.train, images, pre, augment,
                                                tensor_train_transform(pre, augment), self.seed)
            self.val_set = MemoryEvalSet(ctx.splits.val, pre)
            print(f"cache-images: {len(self.train_set)} training and {len(self.val_set)} validation images in "
                  f"memory ({(self.train_set.nbytes + self.val_set.nbytes) / 2**20:.0f} MiB), augmented in this "
                  "process")
        else:
            draft = pre.draft_size()
            self.train_set = ImageListDataset(ctx.splits.train, train_transform(pre, augment), draft, self.seed)
            self.val_set = ImageListDataset(ctx.splits.val, eval_transform(pre), draft)
        self.sample_weights = ctx.sample_weights(self.train_set.samples)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        # order and augmentation from (seed, epoch, index) only: a resumed run repeats them exactly;
        # every sample once per epoch across ranks (padded to equal shards)
        trainer = getattr(self, "trainer", None)
        trainer = trainer if isinstance(trainer, L.Trainer) else None
        # the epoch Lightning itself passes to set_epoch (restored from the checkpoint on resume)
        epoch_fn = (lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else None
        sampler = EpochSampler(len(self.train_set), self.seed, rank, world, self.sample_weights, epoch_fn=epoch_fn)
        # its position is checkpointed: a run resumed mid-epoch goes on after the batches it trained on
        return make_loader(self.train_set, self.batch_size, self.workers, self.seed, sampler=sampler,
                           collate_fn=getattr(self.train_set, "collate", None),
                           loader=partial(ResumableLoader, trainer_fn=lambda: trainer))

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        # unpadded shards: each val image counts exactly once in the synced metrics
        sampler = list(range(rank, len(self.val_set), world)) if world > 1 else None
        return make_loader(self.val_set, self.batch_size * 2, self.workers, self.seed, sampler=sampler)


@dataclass(frozen=True)
class CachedFeatures:
    """Frozen-body features of the run's splits (see :class:`~visiontune.inference.features.FeatureExtractor`).

    Attributes:
        train_x: ``[n, V, d]``: V cached views of each training image (view 0 un-augmented when V = 1).
        train_y: their targets (``[n]`` class indices or ``[n, C]`` multi-hot).
        val_x: ``[m, d]``: the validation images' un-augmented features.
        val_y: their targets.
        train_kept: the indices into the training split of the ``n`` images that could be read.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_kept: list[int]


class FeatureRows(Dataset):
    """Cached features ``[n, V, d]`` as rows: row ``v * n + i`` is view ``v`` of image ``i``.

    Batches are fetched whole (``__getitems__``), by indexing the tensor: no per-row Python work.
    """

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features = features if features.dim() == 3 else features[:, None]
        self.targets = targets
        self.size = len(self.features)

    def __len__(self) -> int:
        return self.size * self.features.shape[1]

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[row % self.size, row // self.size], self.targets[row % self.size]

    def __getitems__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self.features[idx % self.size, idx // self.size], self.targets[idx % self.size]


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # FeatureRows.__getitems__ already returns the stacked batch


class PassBatches(Sampler[list[int]]):
    """The batches of one epoch on cached features: ``passes`` passes over the ``size`` images.

    Pass ``p`` of epoch ``e`` is global pass ``k = e * passes + p``: its order is
    :class:`~visiontune.data.sampling.EpochSampler`'s for ``(seed, k)`` (shuffled, or
    class-balanced draws) and it reads view ``k mod views``, batched within the pass. Everything
    derives from ``(seed, epoch)``, so a resumed run draws the same batches; :meth:`resume_at`
    skips the batches of an epoch a mid-epoch checkpoint had already trained on.
    """

    def __init__(self, size: int, views: int, batch_size: int, passes: int = 1, seed: int = 0,
                 weights: torch.Tensor | None = None, epoch_fn: Callable[[], int | None] | None = None):
        self.size, self.views, self.batch_size, self.passes = size, views, batch_size, passes
        self.seed, self.weights, self.epoch_fn = seed, weights, epoch_fn
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.passes * math.ceil(self.size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make the next iteration epoch ``epoch``'s, after its first ``batches`` batches."""
        self._resume = (int(epoch), int(batches))

    def __iter__(self) -> Iterator[list[int]]:
        current = self.epoch_fn() if self.epoch_fn is not None else None
        if current is not None:  # Lightning's own epoch (set_epoch comes too late on resume)
            self.epoch = int(current)
        skip = 0
        if self._resume is not None:  # the checkpoint's epoch: Lightning's counter may not have moved on yet
            self.epoch, skip = self._resume
            self._resume = None
        return iter(list(self._batches())[skip:])

    def _batches(self) -> Iterator[list[int]]:
        for p in range(self.passes):
            k = self.epoch * self.passes + p
            sampler = EpochSampler(self.size, self.seed, weights=self.weights)
            sampler.set_epoch(k)
            order = sampler.order()
            offset = (k % self.views) * self.size
            for start in range(0, self.size, self.batch_size):
                yield [offset + i for i in order[start:start + self.batch_size]]


class ResumableLoader(DataLoader):
    """A training loader whose position Lightning checkpoints (it has ``state_dict``/``load_state_dict``).

    A run resumed from a mid-epoch checkpoint (``--checkpoint-every-steps``, SIGTERM, or a kill
    after one) continues that epoch after the batches already trained on, instead of replaying its
    first ones. The position is Lightning's own count of the epoch's processed batches; the order
    is a :class:`PassBatches` (cached features) or an
    :class:`~visiontune.data.sampling.EpochSampler` (images, batched by ``batch_size``), each
    told where to start (``resume_at``).
    """

    def __init__(self, dataset: Dataset, trainer_fn: Callable[[], L.Trainer | None], **kwargs):
        super().__init__(dataset, **kwargs)
        self.trainer_fn = trainer_fn

    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer_fn()
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if done >= trainer.num_training_batches:  # the epoch is complete: the next starts at its first batch
            return {"epoch": int(trainer.current_epoch) + 1, "batches": 0}
        return {"epoch": int(trainer.current_epoch), "batches": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # read from a checkpoint, not trusted: whole numbers within this loader's epoch, else the
        # epoch restarts from its first batch (said) rather than skip what it cannot know
        epoch, batches = (state.get("epoch"), state.get("batches")) if isinstance(state, dict) else (None, None)
        if not (type(epoch) is int and type(batches) is int and epoch >= 0 and 0 <= batches < len(self)):
            print(f"warning: the checkpoint's position in its epoch is not valid ({str(state)[:80]}): the epoch "
                  "resumes from its first batch", file=sys.stderr)
            return
        if isinstance(self.batch_sampler, PassBatches):
            self.batch_sampler.resume_at(epoch, batches)
        else:  # a sampler of samples, batched by the loader
            self.sampler.resume_at(epoch, batches * int(self.batch_size))


class FeatureDataModule(L.LightningDataModule):
    """Train/val loaders over cached features, ``passes`` passes over the training images per epoch.

    Args:
        features: the cached features and targets.
        batch_size: rows per training batch.
        seed: the run's seed (the order of every pass derives from it).
        passes: passes over the cached features per epoch (the frozen warm-up makes 10: cheap, no
            image is decoded).
        weights: per-image draw weights (``--balance sampler``), or None.
    """


    def __init__(self, features: CachedFeatures, batch_size: int, seed: int = 0, passes: int = 1,
                 weights: torch.Tensor | None = None):
        super().__init__()
        self.features, self.batch_size, self.seed = features, batch_size, seed
        self.passes, self.weights = passes, weights
        self.train_set = FeatureRows(features.train_x, features.train_y)
        self.val_set = FeatureRows(features.val_x, features.val_y)

    def batches_per_epoch(self) -> int:
        """Training batches in one epoch (what the LR schedule and the EMA horizon count)."""
        return self.passes * math.ceil(self.train_set.size / self.batch_size)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        trainer = trainer if isinstance(trainer, L.Trainer) else None
        epoch_fn = (lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else None
        batches = PassBatches(self.train_set.size, self.features.train_x.shape[1], self.batch_size, self.passes,
                              self.seed, self.weights, epoch_fn)
        return ResumableLoader(self.train_set, lambda: trainer, batch_sampler=batches, collate_fn=_whole_batch)

    def val_dataloader(self) -> DataLoader:
        # one batch: the features are in memory already, and a single validation step leaves no point
        # for a SIGTERM to stop it midway (Lightning would not resume a validation part-done)
        return DataLoader(self.val_set, batch_sampler=[list(range(len(self.val_set)))], collate_fn=_whole_batch)


class InterruptCheckpoint(Callback):
    """Save a checkpoint when training stops on SIGTERM, Ctrl+C or an error.

    (Lightning's own OnExceptionCheckpoint also makes every fresh ``fit`` look for a "last"
    checkpoint to resume from; a new run must never silently resume.)
    """

    def __init__(self, path):
        self.path = path
        self.restored = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning restores a resumed run's checkpoint before this hook: a crash while restoring
        # must not save a step-0 checkpoint that the next --resume would take for the newest
        self.restored = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not self.restored or getattr(exception, "kind", "") == "no_space":  # a full disk: one error, not two
            return
        try:
            trainer.save_checkpoint(self.path)
        except ArtifactError as exc:  # the error that stopped training is the one to report
            print(f"warning: no interrupt checkpoint ({exc})", file=sys.stderr)


def checkpoint_callbacks(ctx: TrainContext, prefix: str = "") -> list:
    """Checkpoints for --resume (the best model is model/, not these).

    The two newest epoch-end checkpoints are kept, so resume can fall back when the newest is
    unreadable; optionally every N steps too; and one on SIGTERM/SIGINT/crash. Each is written
    atomically by :class:`AtomicCheckpointIO` (temp file, fsync, rename). ``prefix`` names the
    files of the head's trainer (``head-``), whose epochs and steps are counted apart from the body's.
    """
    newest_two = {"monitor": "step", "mode": "max", "save_top_k": 2, "enable_version_counter": False}
    callbacks = [
        FolderModelCheckpoint(dirpath=ctx.checkpoint_dir, filename=prefix + "epoch{epoch:03d}",
                              save_on_train_epoch_end=True, auto_insert_metric_name=False, **newest_two),
        InterruptCheckpoint(ctx.checkpoint_dir / f"{prefix}interrupted.ckpt"),
    ]
    if ctx.cfg.runtime.checkpoint_every_steps:
        callbacks.append(FolderModelCheckpoint(dirpath=ctx.checkpoint_dir, filename=prefix + "step{step:07d}",
                                               every_n_train_steps=ctx.cfg.runtime.checkpoint_every_steps,
                                               auto_insert_metric_name=False, **newest_two))
    return callbacks


def make_trainer(ctx: TrainContext, callbacks: list, max_epochs: int, on_features: bool = False,
                 early_stopping: bool = True, logger=None, max_steps: int = -1) -> L.Trainer:
    """The Lightning trainer of one fit, with the run's checkpoints, early stopping and progress bar.

    Args:
        on_features: the classifier layer on cached features: one process on the CPU, in fp32, where
            the features lie (a linear layer gains nothing from moving there or from more processes),
            its checkpoints named ``head-*``.
        early_stopping: stop after ``--early-stopping`` epochs without improvement (not in a warm-up,
            whose length is ``--freeze-epochs``).
        logger: the Lightning logger (default: the run's; False: none).
        max_steps: the optimizer steps after which the fit is done (``--max-steps``; -1: none). A
            :class:`StepLimit` stops it there first, so that Lightning validates the partial epoch;
            the trainer's own limit makes a resumed run that ended there finished.
    """
    rt, optim = ctx.cfg.runtime, ctx.cfg.optim
    # a head's trainer is one process even inside a multi-process run (whose other ranks repeat the
    # warm-up): only rank 0 writes its checkpoints
    checkpoints = checkpoint_callbacks(ctx, "head-" if on_features else "") if not on_features or is_rank_zero() else []
    callbacks = [c for c in callbacks if c is not None] + checkpoints
    if optim.early_stopping and early_stopping:
        callbacks.append(EarlyStopping(monitor=f"val_{optim.select_metric}", mode="max",
                                       patience=optim.early_stopping))
    progress = sys.stderr.isatty() if rt.progress is None else rt.progress
    if progress:
        callbacks.append(TQDMProgressBar(leave=False))
    kwargs = {}
    if rt.limit_train_batches is not None:
        kwargs["limit_train_batches"] = rt.limit_train_batches
    if rt.limit_val_batches is not None:
        kwargs["limit_val_batches"] = rt.limit_val_batches
    if on_features:
        kwargs.update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="32-true")
    else:
        kwargs.update(accelerator="auto", devices=rt.devices, num_nodes=rt.num_nodes, strategy=rt.distributed,
                      **trainer_precision(ctx.precision))
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        use_distributed_sampler=False,  # ImageDataModule shards: train padded, val exactly once
        logger=ctx.logger if logger is None else logger,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=10,
        default_root_dir=ctx.run_dir,
        plugins=[AtomicCheckpointIO(), *kwargs.pop("plugins", [])],
        enable_checkpointing=bool(checkpoints),  # else Lightning would add a checkpoint of its own
        **kwargs,
    )


@dataclass
class FitOutcome:
    """How one fit ended: its best validation score, the trained module's weights at that epoch
    (a warm-up's head), and whether the time budget's deadline stopped it."""

    best: float | None
    best_state: dict[str, torch.Tensor] | None
    out_of_time: bool


def run_fit(ctx: TrainContext, module: ClassifierModule, data: L.LightningDataModule, epochs: int,
            steps_per_epoch: int, *, epoch_offset: int = 0, best: float | None = None,
            resume: Path | None = None, warmup: bool = False, extra: Callback | None = None) -> FitOutcome:
    """The one loop: fit ``module`` on ``data`` for ``epochs`` with the run's callbacks.

    Every fit gets the metrics rows (numbered after ``epoch_offset`` epochs already run), the
    best-epoch ``model/`` (replaced only when ``best`` is beaten), the deadline of a time budget and
    the checkpoints for ``--resume``; the run's own training (not a ``warmup``) also gets
    ``--ema`` and ``--early-stopping``.

    Args:
        steps_per_epoch: optimizer steps per epoch (the EMA's horizon).
        resume: the checkpoint to continue from (this fit's own phase), or None.
        extra: one more callback (progressive's freezing schedule).
    """
    cfg = ctx.cfg
    on_features = module.phase == HEAD_PHASE
    saver = BestModelSaver(ctx.save_best, f"val_{cfg.optim.select_metric}", best, epoch_offset, keep_state=warmup)
    recorder = MetricsRecorder(ctx.layout.metrics_csv, cfg.optim.epochs, epoch_offset)
    ema = EMA(steps_per_epoch * epochs) if cfg.optim.ema and not warmup else None
    timing = time_callbacks(ctx, epoch_offset, on_features)
    max_steps = cfg.optim.max_steps if cfg.optim.max_steps and not on_features else -1
    deadline = next((c for c in timing if isinstance(c, Deadline)), None)
    replans = deadline is not None and not on_features and not warmup and plan_sets_length(ctx)
    limit = StepLimit(max_steps) if max_steps > 0 or replans else None
    replan = None
    if replans:
        def record(steps: int, steps_per_epoch: int) -> tuple[int, bool]:
            partial = steps % steps_per_epoch != 0
            epochs = epoch_offset + math.ceil(steps / steps_per_epoch)
            ctx.cfg = ctx.cfg.replace(epochs=epochs, max_steps=steps if partial else None,
                                      **({"early_steps": module.early[1]} if module.early else {}))
            recorder.metrics_log.total_epochs = epochs
            if is_rank_zero():  # --resume continues the re-planned length
                ctx.cfg.replace(run_dir=str(ctx.run_dir), batch_size=ctx.batch_size).save(ctx.layout.config)
            return epochs, partial

        early = cfg.optim.early_steps or 0, early_step_cost(ctx.plan, cfg.optim.early_size, ctx.preprocessing.height)
        replan = Replan(deadline, limit, MAX_EPOCHS - epoch_offset, record, early=early)
    # the saver before the EMA: validation scores the averaged weights, which the saver must save
    callbacks = [extra, recorder, saver, ema, limit, replan, *timing]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")  # a head trains on the CPU
        # a warm-up is not logged: its steps would overlap the fine-tuning's in the run's logger
        trainer = make_trainer(ctx, callbacks, epochs, on_features, early_stopping=not warmup,
                               logger=False if warmup else None, max_steps=max_steps)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        # frozen layers and --bn-stats frozen keep BatchNorm in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        # expected: a resumed run's, and the fine-tuning's after the warm-up's (one folder for the run)
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
        except (SIGTERMException, SystemExit) as exc:  # SIGTERM, or Lightning's exit after Ctrl+C
            if trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            raise TrainingInterrupted(
                f"training interrupted; checkpoint saved in {ctx.checkpoint_dir}. Continue with: "
                f"visiontune train --resume {ctx.run_dir}") from exc
    return FitOutcome(saver.best, saver.best_state, bool(deadline and deadline.stopped))


def fit_lightning(
    ctx: TrainContext,
    body_groups: list[list[str]],
    body_lrs: list[float],
    freeze: FreezeSchedule | None,
    epoch_offset: int = 0,
    best: float | None = None,
    resume: Path | None = None,
) -> FitOutcome:
    """Train the context's whole model on images for the epochs after ``epoch_offset``; save the
    best as ``model/``.

    Args:
        epoch_offset: epochs already run (the frozen warm-up on cached features).
        best: the best validation score so far; ``model/`` is only replaced when beaten.
        resume: a checkpoint of this fit to continue from.
    """
    # Re-seed: the frozen warm-up consumes random numbers only on a feature-cache miss, and the
    # same seed must give the same run whether the cache was warm or cold.
    L.seed_everything(ctx.cfg.runtime.seed, workers=True, verbose=False)
    model = ctx.model
    module = make_module(ctx, body_groups, body_lrs)
    model.to(memory_format=torch.channels_last)
    module.train()  # Lightning keeps the current mode; feature extraction may have left eval
    data = ImageDataModule(ctx)
    if ctx.cfg.optim.auto_batch_size and not resume:
        tune_batch_size(ctx, module, data)
    epochs = ctx.cfg.optim.epochs - epoch_offset
    return run_fit(ctx, module, data, epochs, stepping_steps(ctx, 1), epoch_offset=epoch_offset, best=best,
                   resume=resume, extra=freeze)


def fit_head(ctx: TrainContext, features: CachedFeatures, epochs: int, passes_per_epoch: int = 1,
             warmup: bool = False, resume: Path | None = None) -> FitOutcome:
    """Train the model's classifier layer on cached features for ``epochs``, through :func:`run_fit`.

    Pass ``p`` of epoch ``e`` reads cached view ``(e * passes_per_epoch + p) mod V``. The loss, LR,
    optimizer and schedule are the run's (the schedule spans these ``epochs``); the best epoch
    saves the whole model as ``model/``.

    Args:
        warmup: the frozen warm-up before fine-tuning: neither EMA nor early stopping, and the
            outcome carries the best epoch's head, to be loaded before the body trains.
        resume: a checkpoint of this fit (``head-*.ckpt``) to continue from.
    """
    cfg = ctx.cfg
    head = ctx.classifier
    for p in head.parameters():
        p.requires_grad = True
    module = make_head_module(ctx)
    weights = ctx.sample_weights([ctx.splits.train[i] for i in features.train_kept])
    data = FeatureDataModule(features, ctx.batch_size, cfg.runtime.seed, passes_per_epoch, weights)
    return run_fit(ctx, module, data, epochs, data.batches_per_epoch(), resume=resume, warmup=warmup)


def plan_sets_length(ctx: TrainContext) -> bool:
    """Whether the run's plan chose how long it trains on images (so a :class:`Replan` may change
    it): not when the user gave ``--epochs`` or ``--max-steps``, nor with ``--auto-batch-size``
    (the tuner's batch size changes the steps after planning)."""
    given = ctx.cfg.given
    return (ctx.plan is not None and ctx.plan.strategy != "linear-probe"
            and not {"epochs", "max_steps", "auto_batch_size"} & set(given))


def stepping_steps(ctx: TrainContext, epochs: int) -> int:
    """Optimizer steps in ``epochs`` (before any --limit-train-batches)."""
    return math.ceil(len(ctx.splits.train) / ctx.batch_size) * epochs


def time_callbacks(ctx: TrainContext, epoch_offset: int, on_features: bool = False) -> list[Callback]:
    """The deadline of a time budget, or the forecast of a run without one (of images: a head's
    epochs on cached features take moments)."""
    finish = len(ctx.splits.val) * 3 / 500 + FINISH_FIXED_S  # refined by the plan when there is one
    if ctx.plan is not None:  # a head validates on cached features: no validation pass to reserve
        finish = ctx.plan.projected.get("finish", finish) + (0.0 if on_features else ctx.plan.val_pass_s)
    processes = ctx.cfg.runtime.devices * ctx.cfg.runtime.num_nodes
    if ctx.deadline is not None and on_features and processes > 1:
        # every process repeats the warm-up on its own: processes that disagreed on stopping there would
        # block each other in the image fit, whose deadline they share (a warm-up takes moments)
        return []
    if ctx.deadline is not None:
        return [Deadline(ctx.deadline, finish, has_model=lambda: (ctx.model_dir / "model.json").is_file(),
                         epoch_offset=epoch_offset)]
    return [] if on_features else [Forecast(ctx.cfg.optim.epochs, epoch_offset, len(ctx.splits.val), finish,
                                            hint=True)]


def make_module(ctx: TrainContext, body_groups: list[list[str]], body_lrs: list[float]) -> ClassifierModule:
    """The LightningModule for ``ctx``, given the few hyperparameters it uses."""
    cfg = ctx.cfg
    return ClassifierModule(ctx.model, ctx.arch.classifier, body_groups, body_lrs, ctx.optimizer_settings(),
                            ctx.schedule_settings(), cfg.optim.label_smoothing, ctx.class_weights(),
                            freeze_bn_stats=cfg.strategy.bn_stats == "frozen", compile=cfg.runtime.compile,
                            mixup=(cfg.optim.mixup, cfg.optim.cutmix), tta=validation_tta(cfg.model.tta),
                            task=ctx.task, teacher=ctx.teacher,
                            distill=(cfg.optim.distill_alpha, cfg.optim.distill_temperature),
                            early=(cfg.optim.early_size, cfg.optim.early_steps) if cfg.optim.early_size else None)


def make_head_module(ctx: TrainContext) -> HeadModule:
    """The run's classifier layer as a :class:`HeadModule`: the run's loss, metrics, optimizer and schedule."""
    cfg = ctx.cfg
    # --max-steps counts the training on images: a head's fit on features runs its epochs whole
    return HeadModule(ctx.classifier, ctx.optimizer_settings(), replace(ctx.schedule_settings(), max_steps=None),
                      cfg.optim.label_smoothing,
                      ctx.class_weights(), task=ctx.task)


def tune_batch_size(ctx: TrainContext, module: ClassifierModule, data: ImageDataModule) -> int:
    """Largest batch size that fits (Lightning's tuner, doubling until out of memory).

    Capped at a quarter of the training set, so a CPU, which rarely runs out of memory, still
    takes several optimizer steps per epoch. The result is kept in the context (and written to
    ``config.yaml`` so that ``--resume`` continues with it).
    """
    from lightning.pytorch.tuner import Tuner  # lazy: only --auto-batch-size uses the tuner

    start = ctx.cfg.optim.batch_size
    cap = max(start, len(ctx.splits.train) // 4)
    trials = max(0, int(math.log2(cap / start)))
    scratch = L.Trainer(accelerator="auto", devices=1, **trainer_precision(ctx.precision), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=ctx.run_dir / "tuner")
    if trials:
        Tuner(scratch).scale_batch_size(module, datamodule=data, mode="power", max_trials=trials, steps_per_trial=2)
    ctx.batch_size = data.batch_size
    ctx.cfg.replace(run_dir=str(ctx.run_dir), batch_size=data.batch_size).save(ctx.layout.config)
    print(f"auto batch size: {data.batch_size}")
    return data.batch_size
