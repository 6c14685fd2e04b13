"""Run a Lightning fit for the gradient-trained strategies (finetune, progressive, scratch)."""

from __future__ import annotations

import math
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ..data.dataset import ImageListDataset, default_workers, make_loader
from ..data.sampling import EpochSampler
from ..data.transforms import draft_size, eval_transform, train_transform
from .checkpoint_io import AtomicCheckpointIO
from .callbacks import BestModelSaver, FreezeSchedule, MetricsRecorder
from .context import TrainContext
from .module import ClassifierModule

class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class ImageDataModule(L.LightningDataModule):
    """Train/val image loaders; ``batch_size`` is an attribute so Lightning's tuner can scale it."""

    def __init__(self, ctx: TrainContext):
        super().__init__()
        cfg, pre = ctx.cfg, ctx.preprocessing
        self.batch_size = cfg.batch_size
        self.seed = cfg.seed
        self.workers = default_workers(cfg.workers)
        draft = draft_size(pre)
        self.train_set = ImageListDataset(ctx.splits.train, train_transform(pre, cfg.augment), draft, cfg.seed)
        self.val_set = ImageListDataset(ctx.splits.val, eval_transform(pre), draft)
        self.sample_weights = ctx.sample_weights()
        if cfg.cache_images:
            side = draft_size({**pre, "jpeg_draft": True})
            held = self.train_set.preload(side) + self.val_set.preload(side)
            print(f"cache-images: {len(self.train_set) + len(self.val_set)} images pre-resized to {side} px "
                  f"in memory ({held / 2**20:.0f} MiB)")

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        # order and augmentation from (seed, epoch, index) only: a resumed run repeats them exactly;
        # every sample once per epoch across ranks (padded to equal shards)
        trainer = getattr(self, "trainer", None)
        # the epoch Lightning itself passes to set_epoch (restored from the checkpoint on resume)
        epoch_fn = (lambda: trainer.fit_loop.epoch_progress.current.processed) if isinstance(trainer, L.Trainer) else None
        sampler = EpochSampler(len(self.train_set), self.seed, rank, world, self.sample_weights, epoch_fn=epoch_fn)
        return make_loader(self.train_set, self.batch_size, self.workers, self.seed, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        # unpadded shards: each val image counts exactly once in the synced metrics
        sampler = list(range(rank, len(self.val_set), world)) if world > 1 else None
        return make_loader(self.val_set, self.batch_size * 2, self.workers, self.seed, sampler=sampler)


class InterruptCheckpoint(Callback):
    """Save a checkpoint when training stops on SIGTERM, Ctrl+C or an error.

    (Lightning's own OnExceptionCheckpoint also makes every fresh ``fit`` look for a "last"
    checkpoint to resume from; a new run must never silently resume.)
    """

    def __init__(self, path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        trainer.save_checkpoint(self.path)


def checkpoint_callbacks(ctx: TrainContext) -> list:
    """Checkpoints for --resume (the best model is model/, not these).

    The two newest epoch-end checkpoints are kept, so resume can fall back when the newest is
    unreadable; optionally every N steps too; and one on SIGTERM/SIGINT/crash. Each is written
    atomically by :class:`AtomicCheckpointIO` (temp file, fsync, rename).
    """
    newest_two = {"monitor": "step", "mode": "max", "save_top_k": 2, "enable_version_counter": False}
    callbacks = [
        ModelCheckpoint(dirpath=ctx.checkpoint_dir, filename="epoch{epoch:03d}", save_on_train_epoch_end=True,
                        auto_insert_metric_name=False, **newest_two),
        InterruptCheckpoint(ctx.checkpoint_dir / "interrupted.ckpt"),
    ]
    if ctx.cfg.checkpoint_every_steps:
        callbacks.append(ModelCheckpoint(dirpath=ctx.checkpoint_dir, filename="step{step:07d}",
                                         every_n_train_steps=ctx.cfg.checkpoint_every_steps,
                                         auto_insert_metric_name=False, **newest_two))
    return callbacks


def make_trainer(ctx: TrainContext, callbacks: list, max_epochs: int) -> L.Trainer:
    cfg = ctx.cfg
    logger = (
        TensorBoardLogger(ctx.run_dir, name="logs", version="")
        if cfg.logger == "tensorboard"
        else CSVLogger(ctx.run_dir, name="logs", version="")
    )
    callbacks = [c for c in callbacks if c is not None] + checkpoint_callbacks(ctx)
    if cfg.early_stopping:
        callbacks.append(EarlyStopping(monitor=f"val_{cfg.select_metric}", mode="max", patience=cfg.early_stopping))
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    if progress:
        callbacks.append(TQDMProgressBar(leave=False))
    kwargs = {}
    if cfg.limit_train_batches is not None:
        kwargs["limit_train_batches"] = cfg.limit_train_batches
    if cfg.limit_val_batches is not None:
        kwargs["limit_val_batches"] = cfg.limit_val_batches
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="auto",
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy_dist,
        use_distributed_sampler=False,  # ImageDataModule shards: train padded, val exactly once
        precision=LIGHTNING_PRECISION[ctx.precision],
        logger=logger,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=10,
        default_root_dir=ctx.run_dir,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def fit_lightning(
    ctx: TrainContext,
    body_groups: list[list[str]],
    body_lrs: list[float],
    freeze: FreezeSchedule | None,
    epoch_offset: int = 0,
    best: float | None = None,
) -> None:
    """Train the context's model for the epochs after ``epoch_offset``; save the best as ``model/``.

    Args:
        epoch_offset: epochs already run (the frozen warm-up on cached features).
        best: the best validation accuracy so far; ``model/`` is only replaced when beaten.
    """
    # Re-seed: the frozen warm-up consumes random numbers only on a feature-cache miss, and the
    # same seed must give the same run whether the cache was warm or cold.
    L.seed_everything(ctx.cfg.seed, workers=True, verbose=False)
    model = ctx.model
    module = ClassifierModule(model, ctx.arch.head, ctx.cfg, body_groups, body_lrs, ctx.class_weights())
    model.to(memory_format=torch.channels_last)
    module.train()  # Lightning keeps the current mode; feature extraction may have left eval
    saver = BestModelSaver(lambda m, metrics: ctx.save_best(m, metrics), f"val_{ctx.cfg.select_metric}", best,
                           epoch_offset)
    recorder = MetricsRecorder(ctx.run_dir / "metrics.csv", ctx.cfg.epochs, epoch_offset)
    trainer = make_trainer(ctx, [freeze, recorder, saver], ctx.cfg.epochs - epoch_offset)
    data = ImageDataModule(ctx)
    if ctx.cfg.auto_batch_size and not ctx.resume_ckpt:
        tune_batch_size(ctx, module, data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        if ctx.resume_ckpt:  # expected when resuming into the same run dir
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ctx.resume_ckpt) if ctx.resume_ckpt else None,
                        weights_only=True)
        except (SIGTERMException, SystemExit) as exc:  # SIGTERM, or Lightning's exit after Ctrl+C
            if trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            raise TrainingInterrupted(
                f"training interrupted; checkpoint saved in {ctx.checkpoint_dir}. Continue with: "
                f"visiontune train --resume {ctx.run_dir}") from exc


def tune_batch_size(ctx: TrainContext, module: ClassifierModule, data: ImageDataModule) -> int:
    """Largest batch size that fits (Lightning's tuner, doubling until out of memory).

    Capped at a quarter of the training set, so a CPU, which rarely runs out of memory, still
    takes several optimizer steps per epoch. The result is written back to the config.
    """
    from lightning.pytorch.tuner import Tuner

    cap = max(ctx.cfg.batch_size, len(ctx.splits.train) // 4)
    trials = max(0, int(math.log2(cap / ctx.cfg.batch_size)))
    scratch = L.Trainer(accelerator="auto", devices=1, precision=LIGHTNING_PRECISION[ctx.precision], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=ctx.run_dir / "tuner")
    if trials:
        Tuner(scratch).scale_batch_size(module, datamodule=data, mode="power", max_trials=trials, steps_per_trial=2)
    ctx.cfg.batch_size = data.batch_size
    print(f"auto batch size: {data.batch_size}")
    return data.batch_size
