"""Run a Lightning fit for the gradient-trained strategies (finetune, progressive, scratch)."""

from __future__ import annotations

import math
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ..core.errors import ArtifactError, TrainingInterrupted
from ..data.dataset import ImageListDataset, default_workers, make_loader
from ..data.memory import MemoryEvalSet, MemoryImages, MemoryTrainSet, store_side
from ..data.sampling import EpochSampler
from ..data.transforms import eval_transform, tensor_train_transform, train_transform
from .budget import FINISH_FIXED_S, Deadline, Forecast
from .callbacks import EMA, BestModelSaver, FreezeSchedule, MetricsRecorder
from .checkpoint_io import AtomicCheckpointIO, FolderModelCheckpoint
from .context import TrainContext
from .module import ClassifierModule

LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


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
        # the epoch Lightning itself passes to set_epoch (restored from the checkpoint on resume)
        epoch_fn = ((lambda: trainer.fit_loop.epoch_progress.current.processed) if isinstance(trainer, L.Trainer)
                    else None)
        sampler = EpochSampler(len(self.train_set), self.seed, rank, world, self.sample_weights, epoch_fn=epoch_fn)
        return make_loader(self.train_set, self.batch_size, self.workers, self.seed, sampler=sampler,
                           collate_fn=getattr(self.train_set, "collate", None))

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


def checkpoint_callbacks(ctx: TrainContext) -> list:
    """Checkpoints for --resume (the best model is model/, not these).

    The two newest epoch-end checkpoints are kept, so resume can fall back when the newest is
    unreadable; optionally every N steps too; and one on SIGTERM/SIGINT/crash. Each is written
    atomically by :class:`AtomicCheckpointIO` (temp file, fsync, rename).
    """
    newest_two = {"monitor": "step", "mode": "max", "save_top_k": 2, "enable_version_counter": False}
    callbacks = [
        FolderModelCheckpoint(dirpath=ctx.checkpoint_dir, filename="epoch{epoch:03d}", save_on_train_epoch_end=True,
                        auto_insert_metric_name=False, **newest_two),
        InterruptCheckpoint(ctx.checkpoint_dir / "interrupted.ckpt"),
    ]
    if ctx.cfg.runtime.checkpoint_every_steps:
        callbacks.append(FolderModelCheckpoint(dirpath=ctx.checkpoint_dir, filename="step{step:07d}",
                                         every_n_train_steps=ctx.cfg.runtime.checkpoint_every_steps,
                                         auto_insert_metric_name=False, **newest_two))
    return callbacks


def make_trainer(ctx: TrainContext, callbacks: list, max_epochs: int) -> L.Trainer:
    rt, optim = ctx.cfg.runtime, ctx.cfg.optim
    callbacks = [c for c in callbacks if c is not None] + checkpoint_callbacks(ctx)
    if optim.early_stopping:
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
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="auto",
        devices=rt.devices,
        num_nodes=rt.num_nodes,
        strategy=rt.distributed,
        use_distributed_sampler=False,  # ImageDataModule shards: train padded, val exactly once
        precision=LIGHTNING_PRECISION[ctx.precision],
        logger=ctx.logger,
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
    L.seed_everything(ctx.cfg.runtime.seed, workers=True, verbose=False)
    model = ctx.model
    module = make_module(ctx, body_groups, body_lrs)
    model.to(memory_format=torch.channels_last)
    module.train()  # Lightning keeps the current mode; feature extraction may have left eval
    epochs = ctx.cfg.optim.epochs
    saver = BestModelSaver(lambda m, metrics: ctx.save_best(m, metrics), f"val_{ctx.cfg.optim.select_metric}", best,
                           epoch_offset)
    recorder = MetricsRecorder(ctx.layout.metrics_csv, epochs, epoch_offset)
    ema = EMA(stepping_steps(ctx, epochs - epoch_offset)) if ctx.cfg.optim.ema else None
    trainer = make_trainer(ctx, [freeze, recorder, saver, ema, *time_callbacks(ctx, epoch_offset)],
                           epochs - epoch_offset)
    data = ImageDataModule(ctx)
    if ctx.cfg.optim.auto_batch_size and not ctx.resume_ckpt:
        tune_batch_size(ctx, module, data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        # frozen layers and --bn-stats frozen keep BatchNorm in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
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


def stepping_steps(ctx: TrainContext, epochs: int) -> int:
    """Optimizer steps in ``epochs`` (before any --limit-train-batches)."""
    return math.ceil(len(ctx.splits.train) / ctx.batch_size) * epochs


def time_callbacks(ctx: TrainContext, epoch_offset: int) -> list[Callback]:
    """The deadline of a time budget, or the forecast of a run without one."""
    finish = len(ctx.splits.val) * 3 / 500 + FINISH_FIXED_S  # refined by the plan when there is one
    if ctx.plan is not None:
        finish = ctx.plan.projected.get("finish", finish) + ctx.plan.val_pass_s
    if ctx.deadline is not None:
        return [Deadline(ctx.deadline, finish, has_model=lambda: (ctx.model_dir / "model.json").is_file(),
                         epoch_offset=epoch_offset)]
    return [Forecast(ctx.cfg.optim.epochs, epoch_offset, len(ctx.splits.val), finish, hint=True)]


def make_module(ctx: TrainContext, body_groups: list[list[str]], body_lrs: list[float]) -> ClassifierModule:
    """The LightningModule for ``ctx``, given the few hyperparameters it uses."""
    cfg = ctx.cfg
    return ClassifierModule(ctx.model, ctx.arch.classifier, body_groups, body_lrs, ctx.optimizer_settings(),
                            ctx.schedule_settings(), cfg.optim.label_smoothing, ctx.class_weights(),
                            freeze_bn_stats=cfg.strategy.bn_stats == "frozen", compile=cfg.runtime.compile,
                            mixup=(cfg.optim.mixup, cfg.optim.cutmix), tta=bool(cfg.model.tta),
                            multi_label=ctx.multi_label)


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
    scratch = L.Trainer(accelerator="auto", devices=1, precision=LIGHTNING_PRECISION[ctx.precision], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=ctx.run_dir / "tuner")
    if trials:
        Tuner(scratch).scale_batch_size(module, datamodule=data, mode="power", max_trials=trials, steps_per_trial=2)
    ctx.batch_size = data.batch_size
    ctx.cfg.replace(run_dir=str(ctx.run_dir), batch_size=data.batch_size).save(ctx.layout.config)
    print(f"auto batch size: {data.batch_size}")
    return data.batch_size
