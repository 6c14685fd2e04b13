"""Static plots (matplotlib, no display needed): training curves and confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..core.safe_io import save_figure  # noqa: E402
from ..training.metrics import read_metrics  # noqa: E402


def plot_curves(metrics_csv: Path, out: Path) -> Path | None:
    """Loss and accuracy per epoch, train vs val."""
    if not Path(metrics_csv).exists():
        return None
    rows = read_metrics(metrics_csv)
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [float(r[f"{split}_{metric}"]) if r[f"{split}_{metric}"] else float("nan") for r in rows]
            ax.plot(epochs, values, style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], out: Path) -> Path:
    n = len(class_names)
    size = min(4 + 0.5 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    if n <= 30:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out
