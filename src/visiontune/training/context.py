"""Everything a strategy needs to train one run, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..data.scan import Splits
from ..hardware import is_rank_zero
from ..models.artifact import save_model
from ..models.factory import Architecture


@dataclass
class TrainContext:
    cfg: TrainConfig
    run_dir: Path
    model: nn.Module
    arch: Architecture
    preprocessing: dict[str, Any]
    splits: Splits
    precision: str
    resume_ckpt: Path | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def model_meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "architecture": self.arch.to_dict(),
            "class_names": list(self.splits.class_names),
            "preprocessing": dict(self.preprocessing),
            "metrics": metrics,
            "training": {
                "strategy": self.cfg.strategy,
                "head": self.cfg.head,
                "epochs": self.cfg.epochs,
                "data": self.cfg.data,
                "val": self.cfg.val,
                "val_fraction": self.cfg.val_fraction,
                "num_train": len(self.splits.train),
                "num_val": len(self.splits.val),
                "seed": self.cfg.seed,
                "precision": self.precision,
                **self.extra_meta,
            },
        }

    def class_counts(self) -> torch.Tensor:
        labels = torch.tensor([label for _, label in self.splits.train], dtype=torch.long)
        return torch.bincount(labels, minlength=len(self.splits.class_names)).float()

    def class_weights(self) -> torch.Tensor | None:
        """Loss weights n / (k * n_c) for ``balance=weights`` (each class weighs the same in total)."""
        if self.cfg.balance != "weights":
            return None
        counts = self.class_counts()
        return counts.sum() / (len(counts) * counts.clamp(min=1))

    def sample_weights(self) -> torch.Tensor | None:
        """Per-sample draw weights 1 / n_c for ``balance=sampler`` (balanced batches on average)."""
        if self.cfg.balance != "sampler":
            return None
        counts = self.class_counts()
        return torch.tensor([1.0 / counts[label].item() for _, label in self.splits.train], dtype=torch.double)

    def save_best(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        if not is_rank_zero():
            return
        save_model(self.model_dir, model, self.model_meta(metrics))
