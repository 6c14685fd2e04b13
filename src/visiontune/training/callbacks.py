"""Lightning callbacks: the layer-freezing policy, per-epoch metrics rows, the best-model artifact, EMA."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback, EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from ..core.errors import ConfigError
from .metrics import EpochRow, MetricsLog


class FreezeSchedule(BaseFinetuning):
    """Freeze body groups, then unfreeze them from the top down on a schedule.

    ``trainable_groups(epoch)`` says how many of the top body groups train in ``epoch``. The
    state is set from scratch at every epoch start, and at the start of a fit, so a resumed run
    lands in the same state (Lightning gives a run resumed mid-epoch no start of that epoch).

    The flags change after the model is wrapped for several processes, whose DDP would not
    synchronise a group unfrozen later: ``--strategy progressive`` trains in one process
    (:data:`~visiontune.training.levers.LEVERS` refuses ``--devices``/``--num-nodes`` with it).
    """

    def __init__(self, trainable_groups: Callable[[int], int], verbose: bool = True):
        super().__init__()
        self.trainable_groups = trainable_groups
        self.verbose = verbose
        self._last: int | None = None

    def _modules_params(self, pl_module) -> list[list]:
        named = dict(pl_module.model.named_parameters())
        return [[named[n] for n in group] for group in pl_module.body_groups]

    def freeze_before_training(self, pl_module) -> None:
        for group in self._modules_params(pl_module):
            for p in group:
                p.requires_grad = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1:  # the options' check refuses it first; this guards the Python API's own use
            raise ConfigError("--strategy progressive trains in one process: use --strategy finetune or drop "
                              "--devices/--num-nodes")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        # after a checkpoint's restore: the epoch the run is in (mid-epoch, no epoch start follows)
        self.finetune_function(pl_module, trainer.current_epoch, trainer.optimizers[0])

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        groups = self._modules_params(pl_module)
        n = min(len(groups), max(0, self.trainable_groups(epoch)))
        for i, group in enumerate(groups):
            for p in group:
                p.requires_grad = i >= len(groups) - n
        pl_module.train(pl_module.training)  # re-apply BN eval for groups still frozen
        if self.verbose and n != self._last:
            state = "head only" if n == 0 else f"head + top {n}/{len(groups)} body group(s)"
            print(f"epoch {epoch + 1}: training {state}")
        self._last = n


class MetricsRecorder(Callback):
    """One :class:`~visiontune.training.metrics.EpochRow` per epoch (after validation).

    ``epoch_offset`` numbers Lightning's epochs after epochs already run elsewhere (the frozen
    warm-up on cached features). On resume, rows of epochs that will run again are dropped.
    """

    def __init__(self, path: Path, total_epochs: int, epoch_offset: int = 0, echo: bool = True):
        self.metrics_log = MetricsLog(path, total_epochs, echo)
        self.epoch_offset = epoch_offset
        self._start = 0.0
        self._images = 0
        self._train_end: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after a resume has restored the loop state; a mid-epoch resume gets no epoch start.
        self._start, self._images, self._train_end = time.perf_counter(), 0, None
        if trainer.global_rank == 0:
            self.metrics_log.start(self.epoch_offset + trainer.current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._images = 0
        self._train_end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        # a fit's validation: ``trainer.training`` is False by then, the function is still fitting
        if trainer.state.fn == TrainerFn.FITTING and self._train_end is None:
            self._train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._start
        m = trainer.callback_metrics

        def value(key: str) -> float | None:
            return None if m.get(key) is None else float(m[key])

        self.metrics_log.append(EpochRow(
            epoch=self.epoch_offset + trainer.current_epoch + 1,
            train_loss=value("train_loss"),
            train_accuracy=value("train_accuracy"), val_loss=value("val_loss"), val_accuracy=value("val_accuracy"),
            lr=trainer.optimizers[0].param_groups[0]["lr"], epoch_seconds=now - self._start,
            images_per_second=self._images * trainer.world_size / max(train_seconds, 1e-9)))


class BestModelSaver(Callback):
    """Saves ``model/`` (safetensors + json) whenever the monitored validation metric improves.

    ``save(metrics)`` saves the run's whole model, also when this trainer trains only its
    classifier layer. With ``keep_state`` the trained module's weights at the best epoch are kept
    too (in memory and in the checkpoint's callback state: a few kilobytes for a classifier layer),
    so that the frozen warm-up hands its best head, not its last, to the fine-tuning after it.
    """

    def __init__(self, save: Callable[[dict], None], monitor: str = "val_accuracy",
                 best: float | None = None, epoch_offset: int = 0, keep_state: bool = False):
        self.save = save
        self.monitor = monitor
        self.best: float | None = best
        self.best_epoch: int | None = None
        self.epoch_offset = epoch_offset
        self.keep_state = keep_state
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, self.epoch_offset + trainer.current_epoch + 1
            if self.keep_state:
                self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
            if trainer.global_rank == 0:
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
                self.save({"epoch": self.best_epoch, **metrics})

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch,
                **({"best_state": self.best_state} if self.best_state is not None else {})}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
        self.best_epoch = state_dict.get("best_epoch")
        self.best_state = state_dict.get("best_state")


class StepLimit(Callback):
    """End a fit after ``max_steps`` optimizer steps (``--max-steps``: a last, partial epoch).

    It stops through ``trainer.should_stop``, after which Lightning still validates the epoch in
    progress (its own ``max_steps`` would end the fit without validating it), so the partial epoch
    has its metrics row and can be the best one.
    """

    def __init__(self, max_steps: int):
        self.max_steps = max_steps  # -1: none (yet: a re-plan may set one)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < self.max_steps <= trainer.global_step:
            trainer.should_stop = True


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, kept in place until the best-model
    saver has run: validation scores the averaged weights, so ``model/`` must get those.

    ``decay`` follows the run's length (a tenth of its steps as the averaging horizon, at most
    1,000 steps), so a short run on a small dataset does not average in its initial weights.
    """

    def __init__(self, total_steps: int):
        decay = min(0.999, max(0.5, 1 - 10 / max(1, total_steps)))
        super().__init__(decay=decay, use_buffers=True)
        self.decay = decay
        self._swapped = False

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass  # stay averaged until the saver (an earlier callback) has seen this epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False
        super().on_train_epoch_end(trainer, pl_module)
