"""Everything a strategy needs to train one run, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TrainConfig
from ..data.scan import Splits
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
                "num_train": len(self.splits.train),
                "num_val": len(self.splits.val),
                "seed": self.cfg.seed,
                "precision": self.precision,
                **self.extra_meta,
            },
        }

    def save_best(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        save_model(self.model_dir, model, self.model_meta(metrics))
