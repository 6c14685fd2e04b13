"""Callbacks: layer freezing schedules, per-epoch metrics rows, and the best-model artifact."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable

from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn

from ..hardware import is_rank_zero

METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "epoch_seconds",
    "train_images_per_second",
]


class FreezeSchedule(BaseFinetuning):
    """Freeze body groups, then unfreeze them from the top down on a schedule.

    ``trainable_groups(epoch)`` says how many of the top body groups train in ``epoch``. The
    state is set from scratch at every epoch start, so a resumed run lands in the same state.
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


def start_metrics_file(path: Path, keep_through_epoch: int = 0) -> None:
    """(Re)write the header, keeping only rows of epochs <= ``keep_through_epoch`` (rank 0 only)."""
    if not is_rank_zero():
        return
    rows = read_metrics(path) if path.exists() else []
    keep = [r for r in rows if int(r["epoch"]) <= keep_through_epoch]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(keep)


def append_metrics_row(path: Path, row: dict) -> None:
    if not is_rank_zero():
        return
    with open(path, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=METRIC_COLUMNS).writerow(row)


class MetricsRecorder(Callback):
    """Writes one ``metrics.csv`` row and one console line per epoch (after validation).

    ``epoch_offset`` numbers Lightning's epochs after epochs already run elsewhere (the frozen
    warm-up on cached features). On resume, rows of epochs that will run again are dropped, so
    each epoch appears once.
    """

    def __init__(self, path: Path, total_epochs: int, epoch_offset: int = 0, echo: bool = True):
        self.path = Path(path)
        self.total_epochs = total_epochs
        self.epoch_offset = epoch_offset
        self.echo = echo
        self._start = 0.0
        self._images = 0
        self._train_end: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after a resume has restored the loop state; a mid-epoch resume gets no epoch start.
        self._start, self._images, self._train_end = time.perf_counter(), 0, None
        if trainer.global_rank == 0:
            start_metrics_file(self.path, self.epoch_offset + trainer.current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._images = 0
        self._train_end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training and self._train_end is None:
            self._train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._start
        m = trainer.callback_metrics
        row = {
            "epoch": self.epoch_offset + trainer.current_epoch + 1,
            "train_loss": _fmt(m.get("train_loss_epoch", m.get("train_loss"))),
            "train_accuracy": _fmt(m.get("train_accuracy")),
            "val_loss": _fmt(m.get("val_loss")),
            "val_accuracy": _fmt(m.get("val_accuracy")),
            "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}",
            "epoch_seconds": f"{now - self._start:.2f}",
            "train_images_per_second": f"{self._images * trainer.world_size / max(train_seconds, 1e-9):.1f}",
        }
        append_metrics_row(self.path, row)
        if self.echo:
            print(format_row(row, self.total_epochs), flush=True)


def format_row(row: dict, total_epochs: int) -> str:
    return (
        f"epoch {row['epoch']}/{total_epochs}  train_loss {row['train_loss']}  "
        f"train_acc {row['train_accuracy']}  val_loss {row['val_loss']}  val_acc {row['val_accuracy']}  "
        f"lr {row['lr']}  {row['epoch_seconds']}s  {row['train_images_per_second']} img/s"
    )


def _fmt(value) -> str:
    return "" if value is None else f"{float(value):.4f}"


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class BestModelSaver(Callback):
    """Saves ``model/`` (safetensors + json) whenever validation accuracy improves."""

    def __init__(self, save: Callable[[nn.Module, dict], None], monitor: str = "val_accuracy",
                 best: float | None = None, epoch_offset: int = 0):
        self.save = save
        self.monitor = monitor
        self.best: float | None = best
        self.best_epoch: int | None = None
        self.epoch_offset = epoch_offset

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, self.epoch_offset + trainer.current_epoch + 1
            if trainer.global_rank == 0:
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
                self.save(pl_module.model, {"epoch": self.best_epoch, **metrics})

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
        self.best_epoch = state_dict.get("best_epoch")

