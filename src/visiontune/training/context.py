"""Everything a strategy needs to train one run, resolved once, in one object.

The user's :class:`~visiontune.training.config.TrainConfig` is never modified: what setup
resolves (run dir, precision, input size, the batch size the tuner found) lives here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.hardware import is_rank_zero
from ..core.layout import RunLayout
from ..data.preprocess import Preprocessing
from ..data.scan import Splits
from ..inference.features import FeatureExtractor
from ..models.artifact import save_model
from ..models.card import ModelCard
from ..models.factory import Architecture
from ..task import Task
from .budget import Plan
from .config import TrainConfig
from .optim import OptimizerSettings, ScheduleSettings
from .tta_choice import validation_tta


@dataclass
class TrainContext:
    cfg: TrainConfig
    layout: RunLayout
    model: nn.Module
    arch: Architecture
    preprocessing: Preprocessing
    splits: Splits
    precision: str
    resume_ckpt: Path | None = None
    batch_size: int = 32
    cache_images: bool = False
    deadline: float | None = None  # epoch seconds by which the whole command must end (--time)
    plan: Plan | None = None
    started: float = 0.0  # epoch seconds when the command's time began (its clock, passed explicitly)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, for timings.json
    # out-of-fold logits and labels of the training images, when a probe was cross-validated: more
    # evidence for the temperature than the validation split (set from the strategy's FitResult)
    calibration_logits: tuple[torch.Tensor, torch.Tensor] | None = None
    logger: Any = None  # the run's Lightning logger (--logger), shared by every trainer of the run
    teacher: Any = None  # --teacher: a distill.Teacher, whose soft targets the training on images adds

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def model_dir(self) -> Path:
        return self.layout.model_dir

    @property
    def checkpoint_dir(self) -> Path:
        return self.layout.checkpoints

    @property
    def classifier(self) -> nn.Module:
        return self.model.get_submodule(self.arch.classifier)

    def optimizer_settings(self) -> OptimizerSettings:
        o = self.cfg.optim
        return OptimizerSettings(o.optimizer, o.lr, o.weight_decay, o.momentum)

    def schedule_settings(self) -> ScheduleSettings:
        o = self.cfg.optim
        return ScheduleSettings(o.schedule, o.warmup_epochs, o.step_size, o.epochs, o.max_steps)

    def feature_extractor(self) -> FeatureExtractor:
        """Frozen-body features of this run's model (the on-disk cache is shared across runs)."""
        return FeatureExtractor(self.model, self.arch.classifier, self.arch.name, self.preprocessing, self.precision,
                                self.cfg.runtime.cache_dir, batch_size=self.batch_size * 2,
                                workers=self.cfg.data.workers, seed=self.cfg.runtime.seed,
                                progress=self.cfg.runtime.progress if is_rank_zero() else False)

    def card(self, metrics: dict[str, Any], training: dict[str, Any] | None = None) -> ModelCard:
        """The model card of this run's model with ``metrics`` (``training``: more facts about how it
        was trained, e.g. a probe's cross-validated selection)."""
        c = self.cfg
        return ModelCard(
            class_names=list(self.splits.class_names), preprocessing=self.preprocessing, architecture=self.arch,
            inference={**({"tta": mode} if (mode := validation_tta(c.model.tta)) else {}),
                       **self.task.card_inference()}, metrics=metrics,
            training={"strategy": c.strategy.name, "head": c.strategy.head, "epochs": c.optim.epochs,
                      "data": c.data.path, "task": self.task.name, "label_delim": c.data.label_delim,
                      "val": c.data.val, "val_fraction": c.data.val_fraction,
                      "num_train": len(self.splits.train), "num_val": len(self.splits.val), "seed": c.runtime.seed,
                      "class_counts": self.splits.counts("train"),
                      "precision": self.precision,
                      **({"distillation": {"teacher": c.optim.teacher, "alpha": c.optim.distill_alpha,
                                           "temperature": c.optim.distill_temperature}} if c.optim.teacher else {}),
                      # where this run was written: the recorded data is re-read only inside this run folder
                      "run_dir": os.path.realpath(self.layout.root), **(training or {})})

    @property
    def task(self) -> Task:
        """What the data's labels are and the model answers (the splits' task)."""
        return self.splits.task

    def class_counts(self) -> torch.Tensor:
        """Training images per class (a multi-label image counts for each of its classes)."""
        return self.task.counts([label for _, label in self.splits.train], len(self.splits.class_names))

    def class_weights(self) -> torch.Tensor | None:
        """Loss weights for ``balance=weights``: n / (k * n_c) per class (each class weighs the same
        in total), or for multi-label data each label's ``pos_weight`` = negatives / positives."""
        if self.cfg.data.balance != "weights":
            return None
        return self.task.class_weights(self.class_counts(), len(self.splits.train))

    def sample_weights(self, samples: list | None = None) -> torch.Tensor | None:
        """Per-sample draw weights for ``balance=sampler``: 1 / n_c of the image's class, or for
        multi-label data 1 / n_c of its rarest label (images with no label: 1 / their count)."""
        if self.cfg.data.balance != "sampler":
            return None
        samples = self.splits.train if samples is None else samples
        return self.task.sample_weights([label for _, label in samples], self.class_counts())

    def save_best(self, metrics: dict[str, Any], training: dict[str, Any] | None = None) -> None:
        """Save the run's whole model as ``model/`` with ``metrics`` (rank 0 only): every trainer's
        best epoch, whether it trained the whole network or only its classifier layer."""
        if is_rank_zero():
            save_model(self.model_dir, self.model, self.card(metrics, training))


@dataclass
class FitResult:
    """What a strategy reports back to its caller (instead of writing into the shared context).

    Attributes:
        best_score: the best validation ``--select-metric`` of the saved model (None: not scored).
        timings: seconds per phase it measured (``features``), for ``timings.json``.
        calibration_logits: out-of-fold logits and targets of the training images, when a probe was
            cross-validated: the temperature is fitted on them instead of the validation split.
    """

    best_score: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    calibration_logits: tuple[torch.Tensor, torch.Tensor] | None = None
