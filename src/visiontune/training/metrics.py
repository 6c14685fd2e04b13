"""``RUN/metrics.csv``: one row per epoch, written (and echoed) by one class for every trainer.

Example:
    >>> log = MetricsLog(Path(tempfile.mkdtemp()) / "metrics.csv", total_epochs=2, echo=False)
    >>> log.start()
    >>> log.append(EpochRow(1, 0.5, 0.8, 0.4, 0.9, lr=1e-3, epoch_seconds=1.0, images_per_second=100.0))
    >>> read_metrics(log.path)[0]["val_accuracy"]
    '0.9000'
"""

from __future__ import annotations

import csv
import tempfile  # noqa: F401  (used by the doctest)
from dataclasses import dataclass
from pathlib import Path

from ..core.hardware import is_rank_zero
from ..core.safe_io import atomic_writer, open_append

METRIC_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                  "train_images_per_second"]


@dataclass
class EpochRow:
    """One epoch's figures (None: not measured, written as an empty cell)."""

    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    lr: float | None
    epoch_seconds: float
    images_per_second: float

    def cells(self) -> dict[str, str]:
        def fmt(value: float | None, spec: str = ".4f") -> str:
            return "" if value is None else format(float(value), spec)

        return {"epoch": str(self.epoch), "train_loss": fmt(self.train_loss),
                "train_accuracy": fmt(self.train_accuracy), "val_loss": fmt(self.val_loss),
                "val_accuracy": fmt(self.val_accuracy), "lr": fmt(self.lr, ".3g"),
                "epoch_seconds": fmt(self.epoch_seconds, ".2f"),
                "train_images_per_second": fmt(self.images_per_second, ".1f")}


def format_row(cells: dict[str, str], total_epochs: int) -> str:
    """The console line of an epoch."""
    return (
        f"epoch {cells['epoch']}/{total_epochs}  train_loss {cells['train_loss']}  "
        f"train_acc {cells['train_accuracy']}  val_loss {cells['val_loss']}  val_acc {cells['val_accuracy']}  "
        f"lr {cells['lr']}  {cells['epoch_seconds']}s  {cells['train_images_per_second']} img/s"
    )


class MetricsLog:
    """Appends :class:`EpochRow` s to ``metrics.csv`` and prints them (rank 0 only)."""

    def __init__(self, path: Path, total_epochs: int, echo: bool = True):
        self.path, self.total_epochs, self.echo = Path(path), total_epochs, echo

    def start(self, keep_through_epoch: int = 0) -> None:
        """(Re)write the header, keeping only rows of epochs <= ``keep_through_epoch``.

        A resumed run drops the rows of epochs it will run again, so each epoch appears once.
        """
        if not is_rank_zero():
            return
        rows = read_metrics(self.path) if self.path.exists() else []
        keep = [r for r in rows if int(r["epoch"]) <= keep_through_epoch]
        with atomic_writer(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(keep)

    def append(self, row: EpochRow) -> None:
        if not is_rank_zero():
            return
        cells = row.cells()
        with open_append(self.path) as fh:
            csv.DictWriter(fh, fieldnames=METRIC_COLUMNS).writerow(cells)
        if self.echo:
            print(format_row(cells, self.total_epochs), flush=True)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))

